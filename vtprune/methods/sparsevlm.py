"""SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(ICML 2025), https://github.com/Gumpest/SparseVLMs (v1.0, ``modelling_sparse_llama.py`` / ``score.py``).

Text-guided progressive pruning inside the LLM:

1. Raters, chosen once at the LLM input: ``m = softmax(V T^T over text).mean(over image tokens)`` with V the
   image tokens' input embeddings and T the instruction's (text after the image); text tokens with ``m`` above its
   mean rate the image.
2. After decoder layers 2, 6 and 15 (0-based, of 32; scaled to other depths) the image tokens are scored by the
   raters' attention in that layer (head mean, rater mean; recomputed from the layer's captured Q/K, so SDPA stays
   on) and the top ones continue. The authors' counts per stage for their budgets (192: 300 / 200 / 110, 128:
   303 / 110 / 36, 96: 238 / 48 / 26, 64: 66 / 30 / 17; average-token accounting) fix the shape of the schedule:
   ``keep`` picks the table of the nearest of those budgets, and earlier stages keep the same multiples of the final
   count. ``keep=192, budget="average"`` thus gives 278 / 185 / 102 on LLaVA-1.5-7B (the authors' 300 / 200 / 110
   average 203 tokens over 32 layers, not 192, since pruning acts after layer 2 so layers 0-2 see all 576).
3. Token recycling: of the tokens a stage drops, the 30 % (+1) with the highest rater attention are clustered with
   density-peak clustering (DPC-KNN, as the authors' ``cluster_and_merge``) into ``n // 10 + 1`` clusters whose means
   re-enter the sequence (through :func:`vtprune.kernels.merge_tokens`).

Choices where the code is thin or batch-1 only (stated so results can be compared): a recycled token takes the slot
and position of its cluster's centre, so it sits in raster order among the kept tokens instead of after them; the
recycled tokens count within the stage budget (top-k + clusters = the budget), whereas the authors add them on top
of their counts; raters and scores are computed per sample. Positions are renumbered contiguously, as the authors'
truncated ``position_ids`` do. All families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method
from vtprune.core.signals import query_slots
from vtprune.kernels import merge_tokens

AUTHORS_LAYERS, REFERENCE_DEPTH = (2, 6, 15), 32
AUTHORS_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_SHARE = 0.3


def recycled_clusters(dropped: int) -> int:
    """Clusters the authors make of ``dropped`` tokens: the top 30 % (+1), one cluster per 10 of those (+1)."""
    if dropped <= 0:
        return 0
    candidates = int(dropped * RECYCLE_SHARE) + 1
    return min(candidates, candidates // 10 + 1)


def density_peak_clusters(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN: (centre of each cluster, cluster of each token). Density from the ``clusters`` nearest neighbours,
    centres by density x distance to a denser token, every token joins its nearest centre."""
    n, dim = x.shape
    distance = torch.cdist(x.float(), x.float()) / math.sqrt(dim)
    nearest = distance.topk(min(clusters, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    to_denser = torch.where(denser, distance, distance.max()).min(-1).values
    centres = (to_denser * density).topk(clusters).indices
    assignment = distance[:, centres].argmin(-1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


@register_method
@dataclass
class SparseVLM(Method):
    """Rater-guided progressive pruning after ``layers`` (0-based; default 2/6/15 of 32, scaled) with recycling."""

    name = "sparsevlm"
    summary = "text raters' attention after layers 2 / 6 / 15, dropped tokens recycled into clusters"
    paper = "Zhang et al., ICML 2025 (Gumpest/SparseVLMs)"
    merges = True

    layers: tuple[int, ...] | None = None
    recycle: bool = True
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layers = model.output_pruned_layers(self.name, self.layers, AUTHORS_LAYERS, REFERENCE_DEPTH)
        counts = self._profile(keep, len(layers))
        # pruning after layer l with layer l's own attention = at the input of layer l + 1, from l's captured Q/K
        return [
            Stage(layer=layer + 1, scale=count / counts[-1], attention_from=layer, text_embeddings=True)
            for layer, count in zip(layers, counts)
        ]

    @staticmethod
    def _profile(keep: Keep, stages: int) -> tuple[float, ...]:
        """The authors' per-stage counts for the budget nearest to ``keep`` (576 tokens for a fraction)."""
        tokens = keep if isinstance(keep, int) else keep * 576
        counts = AUTHORS_COUNTS[min(AUTHORS_COUNTS, key=lambda budget: abs(budget - tokens))]
        if stages != len(counts):  # custom layers: halve at each stage
            return tuple(2.0 ** (stages - 1 - i) for i in range(stages))
        return counts

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        raters = ctx.state.get("raters")
        if raters is None:
            raters = ctx.state["raters"] = self._raters(ctx)
        rows, real = query_slots(ctx.layout, "instruction")
        real = real & torch.nn.functional.pad(raters, (0, real.shape[1] - raters.shape[1]))[:, : real.shape[1]]
        attention = ctx.attention_of(rows, real)
        return [self._select_item(ctx, view, attention[view.sample, view.slots]) for view in ctx.items]

    def _raters(self, ctx: PruneContext) -> Tensor:
        """Per sample, which instruction tokens rate the image, ``[B, T]`` over its instruction tokens in order."""
        texts = ctx.instruction_embeddings
        width = max(1, max(t.shape[0] for t in texts))
        raters = torch.zeros(len(texts), width, dtype=torch.bool, device=ctx.layout.valid.device)
        for sample, text in enumerate(texts):
            images = [view.features for view in ctx.items if view.sample == sample]
            if not images or text.shape[0] == 0:
                continue
            relevance = torch.softmax(torch.cat(images).float() @ text.float().T, dim=1).mean(0)
            raters[sample, : text.shape[0]] = relevance > relevance.mean()
        return raters

    def _select_item(self, ctx: PruneContext, view: ItemView, scores: Tensor) -> Tensor | Merged:
        members = view.selectable.nonzero().squeeze(1)
        budget = view.budget
        clusters = 0
        if self.recycle and budget < members.numel():
            top = budget
            while top > 1 and top + recycled_clusters(members.numel() - top) > budget:
                top -= 1
            clusters = min(recycled_clusters(members.numel() - top), budget - top)
        else:
            top = budget
        order = scores[members].float().topk(top).indices
        kept = members[order]
        if clusters == 0:
            return kept
        dropped_mask = torch.ones_like(members, dtype=torch.bool)
        dropped_mask[order] = False  # a mask instead of torch.isin, which sorts both sides
        dropped = members[dropped_mask]
        candidates = dropped[scores[dropped].float().topk(int(dropped.numel() * RECYCLE_SHARE) + 1).indices]
        # only the rows that are kept or clustered are read: gathering the item's whole hidden states cost more
        hidden = ctx.hidden_states[view.sample]
        candidate_states = hidden[view.slots[candidates]]
        centres, assignment = density_peak_clusters(candidate_states, clusters)
        means = merge_tokens(candidate_states[None], assignment[None], None, clusters)[0]
        indices = torch.cat([kept, candidates[centres]])
        features = torch.cat([hidden[view.slots[kept]], means])
        combined = torch.cat([torch.zeros_like(kept, dtype=torch.bool), torch.ones_like(centres, dtype=torch.bool)])
        return Merged(indices, features, space="llm", combined=combined)
