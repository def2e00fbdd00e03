"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (CVPR 2025), https://github.com/Cooperx521/PyramidDrop.

The LLM is split into 4 stages; at the end of each of the first three (after layers 8, 16 and 24 of 32, 1-based;
scaled to other depths) the image tokens are ranked by the attention the last instruction token pays them, averaged
over heads and recomputed from the next layer's queries and keys (the authors' ``pdrop_rank_drop``), and a fraction
``lam`` of them is kept: 576 -> 288 -> 144 -> 72 with lam = 0.5. Here ``keep`` is the final budget and earlier stages
keep ``lam^-i`` times it, so ``keep=72`` (or 0.125) reproduces the authors' schedule; with ``budget="average"``
``keep`` is their average-token accounting instead. Positions are renumbered contiguously, as the authors do.
All families.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

AUTHORS_LAYERS, REFERENCE_DEPTH = (8, 16, 24), 32


@register_method
@dataclass
class PyramidDrop(Method):
    """Keep ``lam`` of the image tokens after each of ``layers`` (1-based; default 8/16/24 of 32, scaled)."""

    name = "pdrop"
    summary = "last instruction token's attention, image tokens halved after layers 8 / 16 / 24 of 32"
    paper = "Xing et al., CVPR 2025 (Cooperx521/PyramidDrop)"

    layers: tuple[int, ...] | None = None
    lam: float = 0.5
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if not 0 < self.lam <= 1:
            raise ValueError(f"{self.name}: lam must lie in (0, 1], got {self.lam}")

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layers = list(self.layers) if self.layers is not None else model.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
        if layers != sorted(set(layers)):
            raise ValueError(f"{self.name}: layers must increase, got {layers}")
        for layer in layers:
            model.check_layer(self.name, "layers", layer, minimum=1)
        count = len(layers)
        # after layer k (1-based) = at the input of 0-based layer k, scored with that layer's own queries and keys
        return [
            Stage(layer=layer, scale=self.lam ** (i + 1 - count), attention_from=layer, query="last")
            for i, layer in enumerate(layers)
        ]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        return ctx.per_item(ctx.attention())
