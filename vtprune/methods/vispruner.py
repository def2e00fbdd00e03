"""VisPruner — Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (ICCV 2025, arXiv 2412.01818), https://github.com/Theia-4869/VisPruner (``llava/model/llava_arch.py``,
``encode_images``, read at commit aefa01a to understand).

Before the LLM, from visual cues only (no text), each image (each view on LLaVA-NeXT) keeps ``T`` tokens:

1. important tokens: the ``int(T * important_ratio)`` patches with the largest [CLS] attention (averaged over heads)
   in the tower layer LLaVA projects (the penultimate one, the authors' ``attentions[select_layer]``);
2. diverse tokens: the remaining patches, in descending attention order, are de-duplicated step by step on their
   L2-normalised features before the projector: split alternately into A (even places) and B (odd places), score
   each A token by its largest cosine similarity to any B token, drop the ``r = min(8, R - T_div)`` highest-scoring A
   tokens and continue with ``[surviving A, B]`` until ``T_div = T - int(T * important_ratio)`` tokens are left;
3. the important and diverse tokens reach the LLM in raster order (the authors' index mask), with contiguous
   positions.

The authors' default ``important_ratio`` is 0.5 (README: 128 = 64 important + 64 diverse; MME example 0.75).
Selection runs batched over every image (view) with the same token count and budget, as the authors' code runs over
its batch. The [CLS] row is recomputed from the tower's queries and keys, so the tower keeps running with SDPA.
Families: LLaVA-1.5 and LLaVA-NeXT (towers with a [CLS] token); the others raise a clear error naming the methods
that apply.

Where we differ from the authors' code, or choose where it leaves things open:

* Steps that would drop more than the A half: when fewer than 8 tokens above ``T_div`` remain and ``T_div < 8``,
  ``r`` can exceed the A half (``R // 2``), where the authors' indexing fails; we cap ``r`` at the size of A, so the
  loop still ends at exactly ``T_div`` tokens. Unchanged wherever their code runs (``T_div >= 8``).
* An odd number of residual tokens (an odd ``T_imp`` with an even token count, or a view of odd size): A then has one
  token more than B; the authors' code assumes even counts (LightCompress's Qwen port bumps ``T_imp`` instead), we
  score and drop A tokens as usual.
* LLaVA-NeXT: the budget applies per view, as the authors count it (``32 * 5 = 160``); tokens are chosen among those
  that reach the LLM after unpadding (the authors choose among all 576 of a crop and then unpad, which can leave a
  crop fewer than ``T``); the newline tokens are kept as structure.
* A budget that covers a whole view keeps it unchanged (keep = all is the dense model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# The authors drop at most this many tokens per de-duplication step.
TOKENS_PER_STEP = 8


def important_and_diverse(features: Tensor, attention: Tensor, budget: int, important_ratio: float) -> Tensor:
    """VisPruner's selection for ``G`` views of ``n`` tokens at once: ``features [G, n, C]`` (before the projector),
    ``attention [G, n]`` ([CLS] attention); returns ``[G, budget]`` token indices, important ones first."""
    n = features.shape[1]
    budget = min(budget, n)
    important = int(budget * important_ratio)
    diverse = budget - important
    order = attention.argsort(dim=-1, descending=True)
    chosen, residual = order[:, :important], order[:, important:]
    if diverse == 0:
        return chosen
    if residual.shape[1] > diverse:
        # The residual tokens' cosine similarities, computed once: each step then reads its A x B block instead of
        # multiplying the features again (the same cosines up to rounding; ~56 steps for 576 -> 64 at ratio 0.5).
        x = features.float().gather(1, residual[..., None].expand(-1, -1, features.shape[-1]))
        x = x / x.norm(dim=-1, keepdim=True)
        similarity = (x @ x.transpose(-1, -2)).flatten(1)  # [G, R * R]
        size = residual.shape[1]
        place = torch.arange(size, device=features.device).expand_as(residual)  # into the first residual
        while True:
            count = place.shape[1]
            # ours: never more than the A half (the authors' code fails there; equal wherever it runs)
            step = min(TOKENS_PER_STEP, count - diverse, (count + 1) // 2)
            if step <= 0:
                break
            a, b = place[:, ::2], place[:, 1::2]
            block = similarity.gather(1, (a[..., None] * size + b[:, None, :]).flatten(1))  # the A x B cosines
            duplication = block.view(*a.shape, -1).max(dim=-1).values  # each A token's closest B token
            distinct = duplication.argsort(dim=-1, descending=True)[:, step:]
            place = torch.cat([a.gather(1, distinct), b], dim=-1)
        residual = residual.gather(1, place)
    return torch.cat([chosen, residual], dim=-1)


@register_method
@dataclass
class VisPruner(Method):
    """Keep the most [CLS]-attended tokens plus diverse ones left by iterative duplicate removal, before the LLM."""

    name = "vispruner"
    summary = "important tokens by [CLS] attention, then diverse ones by iterative similarity de-duplication"
    paper = "Zhang et al., ICCV 2025, arXiv 2412.01818 (Theia-4869/VisPruner)"
    needs_cls_token = True

    important_ratio: float = 0.5
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(
                f"{self.name}: important_ratio must be a number in [0, 1] (the share of the budget chosen by [CLS] "
                f"attention; the authors use 0.5), got {ratio!r}"
            )

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.require_cls_token(self.name)
        return [Stage(layer=None, per_crop=True, vision_layers=(model.vision_feature_layer,), encoder_features=True)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        # every view of every image, grouped by (token count, budget) so that each group runs as one batch
        jobs: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
        for index, view in enumerate(ctx.items):
            for members, budget in view.budget_groups():
                jobs.setdefault((members.numel(), budget), []).append((index, members))
        chosen: list[list[Tensor]] = [[] for _ in ctx.items]
        for (count, budget), group in jobs.items():
            if budget >= count:  # the whole view fits: nothing to choose
                for index, members in group:
                    chosen[index].append(members)
                continue
            features = torch.stack([ctx.items[i].encoder_features[m] for i, m in group])
            attention = torch.stack([ctx.items[i].cls_attention[-1][m] for i, m in group])
            picked = important_and_diverse(features, attention, budget, self.important_ratio)
            for (index, members), rows in zip(group, picked):
                chosen[index].append(members[rows])
        return [torch.cat(parts) for parts in chosen]
