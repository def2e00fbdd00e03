"""TransPrune — Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model"
(arXiv 2507.20630, CVPR 2026), https://github.com/liaolea/TransPrune.

Progressive pruning inside the LLM, scored by two terms added after L1-normalising each over the image's tokens:

* Token Transition Variation (TTV): for every sub-layer f (attention, MLP) of the accumulating layers, with x the
  sub-layer's normalised input and y its output before the residual add, ``TTV_f = |y| / |x| * softmax(1 - cos(x, y))``
  where the softmax runs over the tokens; a layer contributes ``TTV_attn + TTV_mlp``, summed over the accumulating
  layers seen so far (layers 7-12, 1-based, on 32-layer models).
* Instruction-Guided Attention (IGA): attention from the instruction tokens (the text after the image) to each image
  token, averaged over heads and instruction tokens, recomputed from the next layer's queries and keys.

Image tokens are dropped after layers 7, 9 and 12 (1-based, of 32; scaled to other depths) keeping 0.875 / 0.625 /
0.125 of them: 576 -> 504 -> 360 -> 72 on LLaVA-1.5. Here ``keep`` is the final budget and the earlier stages keep
``ratio_i / ratio_last`` times it, so ``keep=0.125`` (or 72) reproduces the authors' schedule. Positions are renumbered
contiguously, as the authors do. ``ttv_only=True`` drops the IGA term. All families (no vision-tower signal needed).

Deviation, needed for batch = per-sample: the authors' TTV softmax runs over every token of the batch tensor
(padding and other samples included); here it runs over each sample's real tokens, which equals theirs at batch
size 1 without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.layout import Layout
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

REFERENCE_DEPTH = 32
AUTHORS_PRUNE_LAYERS, AUTHORS_ACCUMULATE_FROM = (7, 9, 12), 7
COSINE_EPS = 1e-8  # F.cosine_similarity's default, clamping each norm


def transition_variation(inputs: Tensor, outputs: Tensor, valid: Tensor) -> Tensor:
    """TTV of one sub-layer, ``[B, L]``: norm ratio times the softmax (over each sample's real tokens) of 1 - cos."""
    x, y = inputs.float(), outputs.float()
    # Two norms and one dot product, each one pass over the [B, L, D] states: the norm ratio and the cosine share the
    # norms (F.cosine_similarity recomputed them and materialised both normalised tensors; observe ran 3x slower).
    x_norm, y_norm = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    cosine = (x * y).sum(-1) / (x_norm.clamp(min=COSINE_EPS) * y_norm.clamp(min=COSINE_EPS))
    change = (1 - cosine).masked_fill(~valid, float("-inf"))
    return torch.nan_to_num(y_norm / x_norm * torch.softmax(change, dim=-1))


def normalised(values: Tensor) -> Tensor:
    return values / (values.sum() + 1e-8)


@register_method
@dataclass
class TransPrune(Method):
    """Drop image tokens after ``prune_layers`` (1-based; default the authors' 7, 9, 12 of 32, scaled to the
    model's depth) by TTV accumulated from layer ``accumulate_from`` plus instruction-guided attention."""

    name = "transprune"
    summary = "token transition variation + instruction attention, dropped progressively in the LLM"
    paper = "Li et al., CVPR 2026 (liaolea/TransPrune)"

    prune_layers: tuple[int, ...] | None = None
    accumulate_from: int | None = None
    ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    ttv_only: bool = False
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ratios = tuple(self.ratios)
        if self.prune_layers is not None:
            self.prune_layers = tuple(self.prune_layers)
        if len(self.prune_layers or AUTHORS_PRUNE_LAYERS) != len(self.ratios) or not self.ratios:
            raise ValueError(f"{self.name}: prune_layers and ratios need the same, non-zero length")
        if any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
            raise ValueError(f"{self.name}: ratios must be decreasing fractions in (0, 1], got {self.ratios}")

    def _schedule(self, model: ModelInfo) -> tuple[list[int], int]:
        """0-based decoder layers where stages prune, and the first 0-based accumulating layer.

        The authors' layers (for 32-layer models) are scaled to the model's depth; layers given explicitly are not.
        """
        after = list(self.prune_layers or model.scale_layers(AUTHORS_PRUNE_LAYERS, REFERENCE_DEPTH))
        first = self.accumulate_from or model.scale_layers((AUTHORS_ACCUMULATE_FROM,), REFERENCE_DEPTH)[0]
        if not 1 <= first <= after[0]:
            raise ValueError(f"{self.name}: accumulate_from={first} must lie in [1, {after[0]}] (the first prune layer)")
        # pruning "after layer k" (1-based) acts on the input of 0-based layer k
        for layer in after:
            model.check_layer(self.name, "prune layer", layer, minimum=1)
        return after, first - 1

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layers, _ = self._schedule(model)
        last = self.ratios[-1]
        return [
            Stage(layer=layer, scale=ratio / last, attention_from=None if self.ttv_only else layer, query="instruction")
            for layer, ratio in zip(layers, self.ratios)
        ]

    def observed_layers(self, model: ModelInfo) -> tuple[int, ...]:
        layers, first = self._schedule(model)
        return tuple(range(first, layers[-1]))

    def observe(self, state: dict, layer: int, part: str, inputs: Tensor, output: Tensor, layout: Layout) -> None:
        ttv = transition_variation(inputs, output, layout.valid)
        accumulated = state.setdefault("ttv", {})
        # Summed per slot while the layout stays the same (one add per sub-layer instead of a scatter into the
        # per-token totals); the totals follow the tokens across compactions (keyed by original prompt position).
        if accumulated.get("layout") is not layout:
            total = store_transitions(accumulated)
            if total is None:  # one spare column takes the padding slots' (never read) values
                total = ttv.new_zeros(layout.batch_size, int(layout.token.max()) + 2)
                accumulated["by_token"] = total
            accumulated["layout"], accumulated["index"] = layout, torch.where(layout.valid, layout.token, -1)
            accumulated["by_slot"] = total.gather(1, accumulated["index"] % total.shape[1])
        accumulated["by_slot"] += ttv

    def score(self, ctx: PruneContext) -> list[Tensor]:
        total = store_transitions(ctx.state.get("ttv", {}))
        attention = None if self.ttv_only else ctx.attention()
        scores = []
        for view in ctx.items:
            positions = ctx.layout.token[view.sample, view.slots]
            ttv = (
                total[view.sample, positions]
                if total is not None
                else positions.new_zeros(view.num_tokens, dtype=torch.float)  # on the model's device
            )
            score = normalised(ttv)
            if attention is not None:
                score = score + normalised(attention[view.sample, view.slots])
            scores.append(score)
        return scores


def store_transitions(accumulated: dict) -> Tensor | None:
    """Write the current layout's per-slot TTV sums into the per-token totals ``[B, tokens + 1]``; returns them."""
    total = accumulated.get("by_token")
    if total is not None and "by_slot" in accumulated:
        total.scatter_(1, accumulated["index"] % total.shape[1], accumulated["by_slot"])
    return total
