"""Downsample: give the model a lower-resolution image, so its vision tower makes fewer tokens.

The honest floor of visual-token compression: recent benchmarks (VTC-Bench) found that plainly downsampling the
image beats many pruning methods. On Qwen2-VL / Qwen2.5-VL, whose tower takes any resolution, each still image is
re-encoded on the largest token grid that fits the budget with the image's aspect ratio (the grid ``pool`` would
use): the processor's patches are turned back into the image, resized (bicubic, antialiased), re-patchified with the
processor's own code and encoded again, so the tower itself runs on fewer patches. The new tokens take the new
grid's M-RoPE positions and the text after the image moves up by the positions the image no longer spans, exactly
as if the processor had produced the smaller image; ``generate`` continues consistently. Videos are left alone.

Other families raise a clear error: LLaVA-1.5 / NeXT / OneVision and Gemma 3 resize every view to one size (576
tokens per CLIP view), so a lower-resolution input saves nothing there; ``pool`` is the resolution-like baseline
for them (on LLaVA-NeXT a smaller ``image_grid_pinpoints`` in the processor gives fewer views). Mistral 3's Pixtral
tower takes any resolution, but its 1-D positions need their own re-layout, not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep, pooled_shape
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method


@register_method
@dataclass
class Downsample(Method):
    """Re-encode each image at the resolution whose token grid fits ``keep`` (Qwen2-VL / Qwen2.5-VL)."""

    name = "downsample"
    summary = "re-encode each image at a lower resolution (fewer tower and LLM tokens)"
    paper = "baseline (VTC-Bench's finding)"
    merges = True

    positions: str = "keep"

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if not model.mrope:
            raise ValueError(
                f"{self.name} applies to the dynamic-resolution M-RoPE families (Qwen2-VL to Qwen3.5, GLM-4V), "
                f"whose M-RoPE positions it lays out for the smaller grid, not to {model.family_name} (fixed-size "
                "views give as many tokens at a lower resolution; Mistral 3's native-resolution path is not written "
                "yet); use 'pool' there"
            )
        return [Stage(layer=None, resample=True, modalities=("image",))]

    def target_grid(self, rows: int, cols: int, budget: int) -> tuple[int, int]:
        """The merged-token grid an image of ``rows x cols`` tokens is re-encoded on."""
        return pooled_shape(rows, cols, budget)

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        return [self._replace(ctx, view) for view in ctx.items]

    @staticmethod
    def _replace(ctx: PruneContext, view: ItemView) -> Tensor | Merged:
        if view.replacement is None:  # a video frame, or an image already within budget: as it is
            return view.selectable.nonzero().squeeze(1)
        rows, cols = view.replacement_grid
        grid = view.item.grids[0]
        start = ctx.layout.positions[-3:, view.sample, view.slots[0]]  # (t, h, w) of the image's first token
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        offsets = torch.stack([torch.zeros_like(r), r, c], dim=-1).flatten(0, 1).to(start.device)
        return Merged(
            indices=torch.arange(rows * cols, device=view.tokens.device),
            features=view.replacement,
            positions=start[None, :] + offsets,
            advance=max(grid.height, grid.width) - max(rows, cols),
        )
