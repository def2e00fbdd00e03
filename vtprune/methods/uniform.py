"""Uniform: spatially even subsampling of each image's patch grid.

The budget is spread over the image's grids (LLaVA-NeXT: base view and high-resolution view, in proportion to
their sizes) and each grid keeps a regular lattice of about ``sqrt(k h / w)`` rows by ``k / rows`` columns, cell
centres, trimmed evenly to exactly k. A quarter of a 24 x 24 grid is every other row and column. Items without a
known grid fall back to evenly spaced tokens in sequence order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import split_budget
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import SingleStageMethod, register_method


def lattice(height: int, width: int, count: int) -> Tensor:
    """``count`` raster indices spread evenly over a ``height x width`` grid."""
    if count >= height * width:
        return torch.arange(height * width)
    rows = min(height, max(1, round(math.sqrt(count * height / width))))
    cols = min(width, max(1, math.ceil(count / rows)))
    while rows * cols < count:
        if rows < height:
            rows += 1
        else:
            cols += 1
    row_index = ((torch.arange(rows) + 0.5) * height / rows).floor().long()
    col_index = ((torch.arange(cols) + 0.5) * width / cols).floor().long()
    points = (row_index[:, None] * width + col_index[None, :]).flatten()
    return points[evenly_spaced(points.numel(), count)]


def evenly_spaced(total: int, count: int) -> Tensor:
    """``count`` indices spread evenly over ``range(total)``."""
    return ((torch.arange(count) + 0.5) * total / count).floor().long()


@register_method
@dataclass
class Uniform(SingleStageMethod):
    """Keep an even lattice of ``keep`` tokens per image, before the LLM (``layer=None``) or at layer ``layer``."""

    name = "uniform"
    summary = "spatially even lattice on each image's patch grid"
    paper = "baseline"

    def select(self, ctx: PruneContext) -> list[Tensor]:
        return [self._select_item(view) for view in ctx.items]

    def _select_item(self, view: ItemView) -> Tensor:
        device = view.tokens.device
        grids = view.item.grids
        complete = view.num_tokens == view.item.num_tokens
        if grids and complete:
            counts = split_budget(view.budget, [g.height * g.width for g in grids])
            chosen = torch.cat(
                [g.token_indices()[lattice(g.height, g.width, n)] for g, n in zip(grids, counts) if n > 0]
            )
            return chosen.to(device)  # tokens are complete, so item token index == position in view
        candidates = view.selectable.nonzero().squeeze(1)
        return candidates[evenly_spaced(candidates.numel(), view.budget).to(device)]
