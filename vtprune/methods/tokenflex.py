"""TokenFLEX: one trained projector that serves any visual-token count (Li et al., "TokenFLEX: Unified VLM Training
for Flexible Visual Tokens Inference", arXiv 2504.03154; Li Auto, no public code).

What the paper states (abstract level): training modulates the number of visual tokens stochastically; a lightweight
projector pools the vision features adaptively (average) to an ``n x n`` grid and maps them with a SwiGLU MLP; at
inference the user picks the count (64 / 144 / 256 there) and one checkpoint serves every count.

Our choices (the paper's details are unknown), and why:

* :class:`FlexProjector` reads what LLaVA's projector reads (the tower layer ``vision_feature_layer``, no [CLS]),
  ``adaptive_avg_pool2d`` to ``(rows, cols)``, then ``W2(silu(W1 x) * W3 x)`` into the LLM width; linear layers with
  biases (the LLaVA projector it stands in for has them).
* The grid for a budget is :func:`vtprune.core.budget.pooled_shape` of the image's count (the largest
  ``rows x cols`` that fits, aspect closest to the grid's), as the ``pool`` method picks it, so the two compare at
  equal token counts; training draws the count uniformly from 1..N per batch through the same function, so every
  inference shape is a trained one (the paper's ``n x n`` squares would leave most budgets unreachable on an
  8 x 8 grid).
* Only the flex projector is trained (LLM and tower frozen, cross-entropy on the answers), so the method stays a
  plug-in on the user's checkpoint; the paper trains the whole VLM. Measured before choosing: LoRA adapters (rank 8
  on every linear layer of the decoder) trained jointly with the projector for 300 steps gave 0.72 / 0.64 held-out
  at 8 / 4 tokens, against 0.758 / 0.648 for the projector alone, and cost dense accuracy (0.95 at 64 tokens against
  0.983): a pooled token that averages several cells no longer says which digit sits where, and no tuning of the LLM
  restores that, so the LLM stays the user's.
* Each pooled cell stands on its top-left token and positions are renumbered contiguously (the training prompts
  hold the pooled tokens contiguously), as ``pool`` does; grids of several parts (LLaVA-NeXT crops) split the
  budget by size and are pooled part by part.

Weights: ``weights=None`` loads the ones shipped for the embedded LLaVA (``python -m vtprune.train.tokenflex``);
their metadata names the language model they were trained for, and other models are refused when wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.core.budget import Keep, pooled_shape, split_budget, tokens_to_keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method
from vtprune.core.weights import ModuleCache, checked_weights, weights_path
from vtprune.embedded import trained_dir

NAME = "tokenflex"


class FlexProjector(nn.Module):
    """Adaptive average pooling of a patch grid to ``(rows, cols)`` then a SwiGLU MLP into the LLM width."""

    def __init__(self, vision_width: int, hidden_width: int, text_width: int) -> None:
        super().__init__()
        self.meta = {"vision_width": vision_width, "hidden_width": hidden_width, "text_width": text_width}
        self.w1 = nn.Linear(vision_width, hidden_width)
        self.w3 = nn.Linear(vision_width, hidden_width)
        self.w2 = nn.Linear(hidden_width, text_width)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> FlexProjector:
        """Rebuild from the widths a weights file's metadata holds."""
        return cls(int(meta["vision_width"]), int(meta["hidden_width"]), int(meta["text_width"]))

    def project(self, features: Tensor) -> Tensor:
        """SwiGLU of each token, ``[..., vision_width] -> [..., text_width]``."""
        return self.w2(F.silu(self.w1(features)) * self.w3(features))

    def forward(self, grid: Tensor, rows: int, cols: int) -> Tensor:
        """``grid`` ``[batch, height, width, vision_width]`` -> ``[batch, rows * cols, text_width]`` (raster order)."""
        pooled = pool_grid(grid, rows, cols)
        return self.project(pooled)


def pool_grid(grid: Tensor, rows: int, cols: int) -> Tensor:
    """``adaptive_avg_pool2d`` of ``[batch, height, width, C]`` to ``[batch, rows * cols, C]`` (raster order)."""
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), (rows, cols))
    return pooled.flatten(2).transpose(1, 2)


def cell_corners(height: int, width: int, rows: int, cols: int) -> Tensor:
    """Raster index (in the ``height x width`` grid) of each adaptive-pooling cell's top-left position."""
    r = torch.arange(rows) * height // rows  # adaptive pooling's window starts: floor(i * H / rows)
    c = torch.arange(cols) * width // cols
    return (r[:, None] * width + c[None, :]).flatten()


def flex_shape(keep: Keep, height: int, width: int) -> tuple[int, int]:
    """The pooled grid a budget gives on a ``height x width`` grid (what :class:`TokenFLEX` and training use)."""
    return pooled_shape(height, width, tokens_to_keep(keep, height * width))


@register_method
@dataclass
class TokenFLEX(Method):
    """Pool each image's tower features to the budget's grid and project them with a trained flex projector."""

    name = NAME
    summary = "trained SwiGLU projector over adaptive average pooling, one checkpoint for every token count"
    paper = "arXiv 2504.03154"
    merges = True
    trained = True

    weights: str | None = None
    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return False  # a grid may hold fewer tokens than the budget

    def _path(self) -> Path:
        return weights_path(self.name, self.weights, trained_dir(self.name))

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if not model.per_token_projector:
            raise ValueError(
                f"{self.name}: pools the tower's patch features and replaces a per-token projector, but "
                f"{model.family_name or model.family}'s projector combines several patches per token"
            )
        checked_weights(self.name, self.weights, trained_dir(self.name), model)
        return [Stage(layer=None, encoder_features=True)]

    def select(self, ctx: PruneContext) -> list[Merged]:
        path = self._path()
        results = []
        for view in ctx.items:
            if view.item.modality != "image":
                raise ValueError(f"{self.name}: pools the patch grids of images, not a {view.item.modality}")
            values = view.encoder_features
            flex = _CACHE.get(path, FlexProjector.from_meta, values.device, values.dtype)
            results.append(self._pool(view, values, flex))
        return results

    def _pool(self, view: ItemView, values: Tensor, flex: FlexProjector) -> Merged:
        device = values.device
        parts = view.item.grids if view.num_tokens == view.item.num_tokens else ()
        if not parts:
            raise ValueError(f"{self.name}: needs each image's patch grid, which this item does not report")
        counts = split_budget(view.budget, [g.height * g.width for g in parts])
        indices, features = [], []
        for grid, count in zip(parts, counts):
            if count == 0:
                continue
            rows, cols = pooled_shape(grid.height, grid.width, count)
            tokens = grid.token_indices(device)
            patch = values[tokens].reshape(1, grid.height, grid.width, -1)
            features.append(flex(patch, rows, cols)[0])
            indices.append(tokens[cell_corners(grid.height, grid.width, rows, cols).to(device)])
        return Merged(indices=torch.cat(indices), features=torch.cat(features), space="llm")


_CACHE = ModuleCache()
