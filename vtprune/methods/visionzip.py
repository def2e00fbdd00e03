"""VisionZip — Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
https://github.com/dvlab-research/VisionZip.

Before the projector, each view keeps ``dominant`` tokens and builds ``contextual`` merged ones:

* dominant: the [CLS] token itself plus the ``dominant - 1`` patches with the largest [CLS] attention (summed over
  heads) in the tower layer LLaVA projects (the penultimate one);
* contextual: of the remaining patches, every ``step = remaining // contextual``-th one is a target; every other
  remaining patch joins its most similar target by the cosine of the layer's head-averaged keys; a contextual token
  is ``target + mean(joined)`` (the authors' formula, not a weighted average), merged through
  :func:`vtprune.kernels.merge_tokens`.

The budget splits as the authors' 54 + 10 for 64 (``contextual = round(keep * 10 / 64)``: 162 + 30 for 192, 108 + 20
for 128), per view on LLaVA-NeXT (newlines kept). Features are merged in CLIP space and then projected; positions are
contiguous. LLaVA families only (the [CLS] token is needed; Qwen raises a clear error).

How the output is laid out: vtprune keeps every token in its image's raster order, so dominant patches stay on their
own slots, contextual tokens on their targets' slots and the [CLS] feature on the first remaining patch that is no
target; the authors order them [CLS, dominant..., contextual...]. The LLM sees the same features with contiguous
positions in a different order. A budget that covers a whole view leaves it untouched (keep = all is the dense model;
the authors' code would still insert [CLS] and merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method
from vtprune.kernels import merge_tokens

AUTHORS_CONTEXTUAL_SHARE = 10 / 64


def split_budget(budget: int, share: float = AUTHORS_CONTEXTUAL_SHARE) -> tuple[int, int]:
    """(dominant including [CLS], contextual) tokens for a view's budget: 64 -> (54, 10), 192 -> (162, 30)."""
    contextual = round(budget * share) if budget > 1 else 0
    return budget - contextual, contextual


@register_method
@dataclass
class VisionZip(Method):
    """Keep [CLS] + the most [CLS]-attended patches, and merge the rest into a few contextual tokens, per view."""

    name = "visionzip"
    summary = "dominant tokens by [CLS] attention + contextual tokens merged by key similarity, in CLIP space"
    paper = "Yang et al., CVPR 2025 (dvlab-research/VisionZip)"
    needs_cls_token = True
    merges = True

    contextual_share: float = AUTHORS_CONTEXTUAL_SHARE
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.contextual_share < 1:
            raise ValueError(f"{self.name}: contextual_share must lie in [0, 1), got {self.contextual_share}")

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.require_cls_token(self.name)
        return [Stage(layer=None, per_crop=True, vision_layers=(model.vision_feature_layer,), encoder_features=True)]

    def select(self, ctx: PruneContext) -> list[Merged]:
        return [self._zip(view) for view in ctx.items]

    def _zip(self, view: ItemView) -> Merged:
        indices, features, combined = [], [], []
        for members, budget in view.budget_groups():
            if budget >= members.numel():  # nothing to compress in this view
                indices.append(members)
                features.append(view.encoder_features[members])
                combined.append(torch.zeros_like(members, dtype=torch.bool))
                continue
            chosen, merged = self._zip_view(view, members, budget)
            indices.append(chosen)
            features.append(merged)
            # the dominant tokens lead and pass on their own features; contextual tokens and the [CLS] carrier follow
            flags = torch.ones_like(chosen, dtype=torch.bool)
            flags[: split_budget(budget, self.contextual_share)[0] - 1] = False
            combined.append(flags)
        return Merged(torch.cat(indices), torch.cat(features), space="encoder", combined=torch.cat(combined))

    def _zip_view(self, view: ItemView, members: Tensor, budget: int) -> tuple[Tensor, Tensor]:
        hidden = view.encoder_features[members]
        dominant, contextual = split_budget(budget, self.contextual_share)
        attention = view.cls_attention[-1][members]
        top = attention.topk(dominant - 1).indices.sort().values  # positions within the view's members
        rest = torch.ones(members.numel(), dtype=torch.bool, device=members.device)
        rest[top] = False
        remaining = rest.nonzero().squeeze(1)
        chosen, merged = [members[top]], [hidden[top]]
        targets = remaining[:0]
        if contextual:
            step = max(1, remaining.numel() // contextual)
            target_rows = torch.arange(0, remaining.numel(), step, device=members.device)[:contextual]
            targets = remaining[target_rows]
            joining = remaining[~torch.isin(remaining, targets)]
            keys = F.normalize(view.encoder_keys[members].float(), dim=-1)
            assignment = (keys[joining] @ keys[targets].T).argmax(dim=1)
            joined_mean = merge_tokens(hidden[joining][None], assignment[None], None, targets.numel())[0]
            chosen.append(members[targets])
            merged.append(hidden[targets] + joined_mean)
        carrier = remaining[~torch.isin(remaining, targets)][0]  # the [CLS] feature rides on this slot
        chosen.append(members[carrier].view(1))
        view_id = int(view.groups[members[0]]) if view.groups is not None else 0
        merged.append(view.cls_features[view_id].view(1, -1).to(hidden.dtype))
        return torch.cat(chosen), torch.cat(merged)
