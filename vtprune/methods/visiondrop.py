"""VisionDrop — Xu, Wang, Luo, Du, "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment"
(arXiv 2506.22283, AAAI 2026), https://github.com/Ruixxxx/VisionDrop (LLaVA-1.5 only;
``llava/visionzip/`` and ``llava/model/modeling_llama_visiondrop.py``).

Training-free and visual-only: no text token ranks the image. Progressive, in four stages:

1. At the CLIP output (before the LLM), VisionZip verbatim (the authors patch it in): per view, [CLS] + the
   patches with the largest [CLS] attention of the projected tower layer are *dominant*; of the rest, every
   ``step``-th is a target and every other joins its most key-similar target, a *contextual* token being
   ``target + mean(joined)``, merged in CLIP space (``vtprune.methods.visionzip``). Default 42 dominant
   (incl. [CLS]) + 6 contextual = 48 tokens.
2. After decoder layers 8, 16 and 24 (1-based, of 32; scaled to other depths) the image tokens are scored by the
   attention they receive from the image tokens themselves: queries and keys of the next layer (0-based index =
   the stage layer) recomputed from its input, causal softmax over all keys, mean over heads, image-key columns,
   mean over the image queries (``visiondrop_rank_drop``; recomputed here with ``ctx.attention_of`` for just the
   image rows, so the model keeps SDPA). The top ``dominant`` continue, and the rest are merged into
   ``contextual`` tokens by the same stride-target rule, now on the LLM hidden states. Authors' counts
   (dominant, contextual): (30, 5), (22, 4), (16, 3).

Budget accounting (the authors' ``--dominant 42 --contextual 6 --image_token_list [[30,5],[22,4],[16,3]]``):
48 tokens for layers 1-8, 35 for 9-16, 26 for 17-24 and 19 for 25-32, an average of 32 per layer (their README's
"average token retention of 32 tokens"). ``schedule`` fixes the shape: stage i keeps ``total_i / total_last``
times the final budget, and ``contextual_i / total_i`` of it are contextual (rounded, as VisionZip splits). So
``keep=19`` (the final count, vtprune's default ``budget="final"``) or ``keep=32, budget="average"`` (the authors'
accounting) reproduces 48 / 35 / 26 / 19 on LLaVA-1.5-7B; a fraction counts the view's 576 tokens. Positions are
renumbered contiguously after every stage, as the authors' ``position_ids`` are.

Choices that are ours (the authors' code leaves them open or we deviate):

* Merge metric inside the LLM: the authors assign tokens by the cosine of the stage layer's keys (after RoPE,
  averaged over KV heads). vtprune's core offers a stage the layer's input hidden states and attention rows, not its
  key states, so we use the cosine of the hidden states (the very vectors the contextual tokens average). Which
  tokens are kept (dominant + targets) does not depend on the metric; only the contextual features do.
* Token order: vtprune keeps every token in raster order (dominant tokens on their own slots, contextual tokens on
  their targets' slots, the stage-0 [CLS] feature on the first remaining non-target patch, as our VisionZip does);
  the authors place the image span as [CLS, dominant..., contextual...] after stage 0 and [dominant...,
  contextual...] after each LLM stage. The LLM sees the same features with contiguous positions in a different
  order, and the stride targets of later stages are counted over our order.
* LLaVA-NeXT (the authors' released code is LLaVA-1.5 only): every stage works per view, as our VisionZip does
  (``keep`` counts per view, newlines always kept); the image-query rows of the LLM stages are the whole image
  span (all views and newlines), as the authors take the whole span.
* Several images in one prompt (the authors assume one): each image is scored by its own image queries.
* A budget that covers a whole view leaves it untouched (keep = all is the dense model).

Families: LLaVA-1.5 and LLaVA-NeXT. Stage 1 needs the tower's [CLS] token: Qwen2-VL / Qwen2.5-VL / Qwen3-VL /
Qwen3.5, LLaVA-OneVision and Gemma 3 (SigLIP), Mistral 3 (Pixtral) and InternVL (its [CLS] attention is not mapped
onto pixel-shuffled tokens) raise a clear error naming the methods that apply.
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
from vtprune.methods.visionzip import VisionZip, split_budget

AUTHORS_LAYERS, REFERENCE_DEPTH = (8, 16, 24), 32
# (dominant, contextual) at the CLIP output and after each of AUTHORS_LAYERS (the authors' scripts)
AUTHORS_SCHEDULE = ((42, 6), (30, 5), (22, 4), (16, 3))


@register_method
@dataclass
class VisionDrop(Method):
    """VisionZip at the CLIP output, then image->image attention drops + merges after layers 8 / 16 / 24 of 32."""

    name = "visiondrop"
    summary = "VisionZip before the LLM, then visual-only (image->image) attention drops + merges after 8 / 16 / 24"
    paper = "Xu et al., AAAI 2026 (Ruixxxx/VisionDrop)"
    needs_cls_token = True
    merges = True

    layers: tuple[int, ...] | None = None
    schedule: tuple[tuple[int, int], ...] = AUTHORS_SCHEDULE
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)
        self.schedule = tuple(tuple(stage) for stage in self.schedule)
        for stage in self.schedule:
            if len(stage) != 2 or any(isinstance(n, bool) or not isinstance(n, int) for n in stage):
                raise ValueError(f"{self.name}: schedule holds (dominant, contextual) int pairs, got {stage!r}")
            dominant, contextual = stage
            if dominant < 1 or contextual < 0:
                raise ValueError(f"{self.name}: schedule needs dominant >= 1 and contextual >= 0, got {stage!r}")
        if len(self.schedule) < 2:
            raise ValueError(f"{self.name}: schedule needs the CLIP-output stage and at least one LLM stage")
        totals = [d + c for d, c in self.schedule]
        if totals != sorted(totals, reverse=True):
            raise ValueError(f"{self.name}: schedule totals must not grow from stage to stage, got {totals}")

    def _layers(self, model: ModelInfo) -> list[int]:
        if self.layers is None:
            return model.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
        return list(self.layers)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.require_cls_token(self.name)
        layers = self._layers(model)
        if layers != sorted(set(layers)):
            raise ValueError(f"{self.name}: layers must increase, got {layers}")
        for layer in layers:
            model.check_layer(self.name, "layers", layer, minimum=1)
        if len(layers) != len(self.schedule) - 1:
            raise ValueError(
                f"{self.name}: schedule has {len(self.schedule)} (dominant, contextual) pairs, so it needs "
                f"{len(self.schedule) - 1} layers, got {layers}"
            )
        totals = [d + c for d, c in self.schedule]
        first = Stage(
            layer=None,
            scale=totals[0] / totals[-1],
            per_crop=True,
            vision_layers=(model.vision_feature_layer,),
            encoder_features=True,
        )
        # after layer l (1-based) = at the input of 0-based layer l, scored with that layer's own queries and keys
        return [first] + [
            Stage(layer=layer, scale=total / totals[-1], per_crop=True, attention_from=layer)
            for layer, total in zip(layers, totals[1:])
        ]

    def _share(self, index: int) -> float:
        """The contextual share of stage ``index``'s budget."""
        dominant, contextual = self.schedule[index]
        return contextual / (dominant + contextual)

    def select(self, ctx: PruneContext) -> list[Merged]:
        if ctx.stage.layer is None:
            zipper = VisionZip(contextual_share=self._share(0))
            return [zipper._zip(view) for view in ctx.items]
        index = 1 + self._layers(ctx.model).index(ctx.stage.layer)
        scores = image_attention(ctx)
        return [self._drop(ctx, view, score, self._share(index)) for view, score in zip(ctx.items, scores)]

    def _drop(self, ctx: PruneContext, view: ItemView, scores: Tensor, share: float) -> Merged:
        """Per view: the top ``dominant`` by image->image attention, the rest merged into contextual tokens."""
        hidden = ctx.hidden_states[view.sample]
        indices, features, combined = [], [], []
        for members, budget in view.budget_groups():
            states = hidden[view.slots[members]]
            if budget >= members.numel():  # nothing to drop in this view
                chosen, merged, flags = members, states, torch.zeros_like(members, dtype=torch.bool)
            else:
                chosen, merged, flags = contextual_merge(scores[members], states, budget, share)
                chosen = members[chosen]
            indices.append(chosen)
            features.append(merged)
            combined.append(flags)
        return Merged(torch.cat(indices), torch.cat(features), space="llm", combined=torch.cat(combined))


def image_attention(ctx: PruneContext) -> list[Tensor]:
    """Per item, the attention each of its tokens receives from the item's own tokens: causal softmax over every key,
    mean over heads and over the item's query rows (the authors' visual-only score). Items of different samples
    share one recomputation; a sample's second image gets its own."""
    counts: dict[int, int] = {}
    rounds: dict[int, list[ItemView]] = {}
    for view in ctx.items:
        rank = counts.get(view.sample, 0)
        counts[view.sample] = rank + 1
        rounds.setdefault(rank, []).append(view)
    scores: dict[int, Tensor] = {}
    batch, device = ctx.layout.batch_size, ctx.layout.valid.device
    for views in rounds.values():
        width = max(view.slots.numel() for view in views)
        rows = torch.zeros(batch, width, dtype=torch.long, device=device)
        real = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for view in views:
            rows[view.sample, : view.slots.numel()] = view.slots
            real[view.sample, : view.slots.numel()] = True
        attention = ctx.attention_of(rows, real)
        for view in views:
            scores[view.order] = attention[view.sample, view.slots]
    return [scores[view.order] for view in ctx.items]


def contextual_merge(scores: Tensor, hidden: Tensor, budget: int, share: float) -> tuple[Tensor, Tensor, Tensor]:
    """The authors' dominant + contextual step on one view's tokens (in order): the top ``dominant`` by ``scores``
    keep their own states; of the rest, targets at a uniform stride over the remaining tokens, every other one
    joining its most similar target (cosine of ``hidden``), a contextual token being ``target + mean(joined)``.
    Returns (positions kept, their features, whether each is merged), dominant tokens first."""
    dominant, contextual = split_budget(budget, share)
    top = scores.float().topk(dominant).indices.sort().values
    rest = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    rest[top] = False
    remaining = rest.nonzero().squeeze(1)
    if contextual == 0:
        return top, hidden[top], torch.zeros_like(top, dtype=torch.bool)
    step = max(1, remaining.numel() // contextual)
    targets = remaining[torch.arange(0, remaining.numel(), step, device=scores.device)[:contextual]]
    joining = remaining[~torch.isin(remaining, targets)]
    metric = F.normalize(hidden.float(), dim=-1)
    assignment = (metric[joining] @ metric[targets].T).argmax(dim=1)
    joined_mean = torch.zeros_like(hidden[targets])  # a target nobody joins stays itself (the authors' clamp)
    if joining.numel():
        joined_mean = merge_tokens(hidden[joining][None], assignment[None], None, targets.numel())[0]
    chosen = torch.cat([top, targets])
    features = torch.cat([hidden[top], hidden[targets] + joined_mean])
    flags = torch.cat([torch.zeros_like(top, dtype=torch.bool), torch.ones_like(targets, dtype=torch.bool)])
    return chosen, features, flags
