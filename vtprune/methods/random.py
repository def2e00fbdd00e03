"""Random: keep a uniformly random subset of each image's tokens.

The floor every pruner has to beat (used as a baseline by FasterVLM, VisionZip, DivPrune, ...). Seeded per image
from ``seed``, the image's place in its prompt and the stage, so a sample draws the same tokens alone or in a
batch, and a run is reproducible. ``seed=None`` draws from torch's global generator instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.context import PruneContext
from vtprune.core.registry import SingleStageMethod, register_method


@register_method
@dataclass
class Random(SingleStageMethod):
    """Keep ``keep`` random tokens per image, before the LLM (``layer=None``) or at decoder layer ``layer``."""

    name = "random"
    summary = "uniformly random subset of each image's tokens (seeded)"
    paper = "baseline"

    seed: int | None = 0

    def score(self, ctx: PruneContext) -> list[Tensor]:
        scores = []
        for view in ctx.items:
            if self.seed is None:
                draw = torch.rand(view.item.num_tokens)
            else:
                stage = -1 if ctx.stage.layer is None else ctx.stage.layer
                generator = torch.Generator().manual_seed(hash((self.seed, view.item.visual_offset, stage)) % 2**63)
                draw = torch.rand(view.item.num_tokens, generator=generator)
            scores.append(draw.to(view.tokens.device)[view.tokens])
        return scores
