"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution LLaVA.

An image becomes a base view (a square grid, 576 tokens on LLaVA-NeXT-7B) followed by the unpadded high-resolution
grid, each of its rows ended by an ``image_newline`` token. The whole image is one item with two grids; the newline
tokens are structural: always kept and not counted in the budget (as FasterVLM keeps them).

The layout is read off the features themselves: newline rows are exact copies of the model's ``image_newline``
vector. This works also inside ``generate``, which encodes images before prefill and drops ``image_sizes``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vtprune.adapters.llava import LlavaAdapter
from vtprune.core.adapter import ItemSpec
from vtprune.core.layout import GridPart


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    display_name = "LLaVA-NeXT"
    model_class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    model_types = ("llava_next",)
    views_per_image = 0  # base view + a grid of crops that depends on the image size

    def image_item(self, features: Tensor, inputs: dict[str, Any]) -> ItemSpec:
        num_tokens = features.shape[0]
        newline = self.vlm.image_newline.to(features.device, features.dtype)
        structural = (features == newline).all(-1).cpu()
        side = self._patch_grid()
        base = side * side
        if self._select_strategy(inputs) != "default" or num_tokens <= base:
            return ItemSpec(0, num_tokens, structural=structural if structural.any() else None)
        high_res = structural[base:]
        newlines = high_res.nonzero().squeeze(1)
        if newlines.numel() == 1 and num_tokens == base + 1:  # single view: the grid, then one newline
            return ItemSpec(0, num_tokens, (GridPart(0, side, side, side),), structural)
        width = int(newlines[0]) if newlines.numel() else 0
        height = newlines.numel()
        expected = (torch.arange(height) * (width + 1) + width).tolist()
        if width == 0 or newlines.tolist() != expected or high_res.numel() != height * (width + 1):
            return ItemSpec(0, num_tokens, structural=structural if structural.any() else None)
        grids = (GridPart(0, side, side, side), GridPart(base, height, width, width + 1))
        return ItemSpec(0, num_tokens, grids, structural)


    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        image_sizes = call.get("image_sizes")
        if image_sizes is None or self._select_strategy(call) != "default":
            return None
        config = self.vlm.config
        side = self._patch_grid()
        per_view = side * side + 1
        views = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]
        # Run the model's own pack/unpad on a map of source indices instead of features: every packed token
        # then carries the tower position it came from, newlines carry -1.
        maps, offset = [], 0
        for count in views:
            view_ids = torch.arange(offset, offset + count, dtype=torch.float64)[:, None]
            positions = torch.arange(1, per_view, dtype=torch.float64)[None, :]
            maps.append((view_ids * per_view + positions)[..., None])
            offset += count
        packed, _ = self.vlm.pack_image_features(
            maps, image_sizes.cpu(), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        return [p[:, 0].round().long() for p in packed], per_view
