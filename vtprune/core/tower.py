"""The LLM side of a ViT method wrapped inside a VLM: a pre-LLM stage that keeps the tokens a reduced tower's
rows stand on. Built by ``vtprune.wrap``, never registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage
from vtprune.core.vit import ViTMethod


@dataclass
class TowerReduction(Method):
    """The LLM side of a ViT method wrapped inside a VLM (``vtprune.wrap(llava, "tome", keep=64)``).

    The tower reduces its own rows (the method runs between its blocks, as on a bare ViT); before the LLM each image
    keeps exactly the tokens those rows stand on (a kept row's own patch, a merged row's destination, EViT's fused
    row its first member), carrying the rows' projected features. Positions follow ``positions`` as for any
    pre-LLM method. Not registered: ``vtprune.wrap`` builds it when a ViT method meets a VLM.
    """

    vit: ViTMethod | None = None
    summary: ClassVar[str] = "a ViT method reducing the VLM's vision tower"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vit is None:
            raise ValueError("TowerReduction needs the ViT method that reduces the tower (vit=...)")
        self.name = self.vit.name  # reports name the tower's method  # type: ignore[misc]
        self.paper = self.vit.paper  # type: ignore[misc]

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        return [Stage(layer=None, tower=True, modalities=("image",))]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        chosen = []
        for view in ctx.items:
            if view.tower_tokens is None:
                raise ValueError(
                    f"{self.name} reduces the vision tower, but this image was encoded outside the wrapped model "
                    "(precomputed mm_encoder_outputs); pass pixel_values instead"
                )
            indices = torch.searchsorted(view.tokens, view.tower_tokens.to(view.tokens.device))
            chosen.append(indices[view.selectable[indices]])  # [CLS] ("full" strategy) stays as a structural token
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.vit.name, **self.vit.options(), "positions": self.positions, "tower": True}
