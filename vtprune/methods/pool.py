"""Pooling: 2-D average pooling of each image's patch grid down to the budget.

The classic baseline of visual-token compression (e.g. LLaVA-1.5 tokens pooled 2x2 -> 144, 3x3 -> 64, 4x4 -> 36):
each grid is cut into ``ph x pw`` cells (``ph * pw`` the largest product that fits the budget, then the shape
closest to the grid's aspect ratio), every token is averaged into its cell through :func:`vtprune.kernels.merge_tokens`, and a cell's mean takes
the place (and position) of its top-left token. For divisible grids this is exactly ``avg_pool2d``; otherwise cells
partition the grid (no overlap). ``where="after"`` pools the projected tokens (LLM space, every family; on Qwen the
merged-patch grid); ``where="before"`` pools CLIP features and projects the means (LLaVA families; Qwen's merger
combines 2x2 patches and has no per-token projector). Positions are renumbered contiguously. A budget that no
grid shape fits exactly keeps slightly fewer tokens (a prime 61 on a 24 x 24 grid gives 6 x 10 = 60).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep, pooled_shape, split_budget
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, ModelInfo, SingleStageMethod, Stage, register_method
from vtprune.kernels import merge_tokens

PLACES = ("after", "before")


def cell_of(height: int, width: int, rows: int, cols: int) -> Tensor:
    """Raster index of the pooled cell each grid position falls in, ``[height * width]``."""
    r = torch.arange(height) * rows // height
    c = torch.arange(width) * cols // width
    return (r[:, None] * cols + c[None, :]).flatten()


@register_method
@dataclass
class Pool(SingleStageMethod):
    """Average-pool each image's grid to ``keep`` tokens, after (default) or before the projector."""

    name = "pool"
    summary = "2-D average pooling of each image's grid to the budget (merge kernel)"
    paper = "baseline"
    merges = True

    where: str = "after"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.where not in PLACES:
            raise ValueError(f"{self.name}: where must be one of {PLACES}, got {self.where!r}")

    def count_known_early(self) -> bool:
        return False  # a grid may hold fewer tokens than the budget

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if self.where == "before":
            if self.layer is not None:
                raise ValueError(f"{self.name}: where='before' pools before the LLM; leave layer=None")
            if not model.per_token_projector:
                raise ValueError(
                    f"{self.name}: where='before' needs a per-token projector; {model.family_name}'s projector "
                    "combines several patches per token, so use where='after'"
                )
            return [Stage(layer=None, encoder_features=True)]
        return super().stages(model, keep)

    def select(self, ctx: PruneContext) -> list[Merged]:
        if self.where == "before":
            for view in ctx.items:
                if view.item.modality != "image":
                    raise ValueError(
                        f"{self.name}: where='before' pools the tower's patch features of images; a "
                        f"{view.item.modality}'s tokens are pooled by {ctx.model.family_name} itself after its "
                        "projector, so use where='after'"
                    )
        values_of = (lambda v: v.encoder_features) if self.where == "before" else self._llm_values(ctx)
        return [self._pool(view, values_of(view)) for view in ctx.items]

    @staticmethod
    def _llm_values(ctx: PruneContext):
        if ctx.stage.layer is None:
            return lambda view: view.features
        return lambda view: ctx.hidden_states[view.sample, view.slots]

    def _pool(self, view: ItemView, values: Tensor) -> Merged:
        device = view.tokens.device
        complete = view.num_tokens == view.item.num_tokens
        parts = view.item.grids if complete and view.item.grids else ()
        if not parts:  # no grid known: pool runs of consecutive tokens
            members = view.selectable.nonzero().squeeze(1)
            dst = torch.full((view.num_tokens,), -1, dtype=torch.long, device=device)
            dst[members] = torch.arange(members.numel(), device=device) * view.budget // members.numel()
            cells = view.budget
        else:
            counts = split_budget(view.budget, [g.height * g.width for g in parts])
            dst = torch.full((view.num_tokens,), -1, dtype=torch.long)
            cells = 0
            for grid, count in zip(parts, counts):
                if count == 0:
                    continue
                rows, cols = pooled_shape(grid.height, grid.width, count)
                dst[grid.token_indices()] = cell_of(grid.height, grid.width, rows, cols) + cells
                cells += rows * cols
            dst = dst.to(device)
        means = merge_tokens(values[None], dst[None], None, cells)[0]
        positions = torch.arange(view.num_tokens, device=device)
        first = torch.full((cells,), view.num_tokens, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, dst.clamp(min=0), positions.masked_fill(dst < 0, view.num_tokens), "amin")
        space = "encoder" if self.where == "before" else "llm"
        return Merged(indices=first, features=means, space=space)
