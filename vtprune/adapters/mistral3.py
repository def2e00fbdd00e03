"""Mistral 3 (``Mistral3ForConditionalGeneration``, Mistral-Small-3.x): Pixtral tower (no [CLS], native
resolution, 2-D RoPE), a 2x2 patch merger and MLP projector, a Mistral decoder with 1-D RoPE.

Each image is one item on its merged grid (``image_size // (patch * 2)``). The processor writes an ``[IMG_BREAK]``
token after every row of ``[IMG]`` placeholders and ``[IMG_END]`` after the last: those are ordinary text tokens,
so they always stay and keep the image's row structure visible to the LLM whatever a method drops. Positions
follow the method's convention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk, _to_unit_range
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class Mistral3Adapter(Adapter):
    family = "mistral3"
    display_name = "Mistral 3"
    model_class_names = ("Mistral3ForConditionalGeneration", "Mistral3Model")
    model_types = ("mistral3",)
    has_cls_token = False
    cls_position = None
    per_token_projector = False  # the merger mixes 2x2 patches

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision, text = config.vision_config, config.get_text_config()
        merge = config.spatial_merge_size
        return VisionShape(
            encoder_input="grid",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            merge=merge,
            gated_mlp=True,
            # merger (4 patches -> 1), then linear_1 and linear_2 on each merged token
            projector_layers=(
                (vision.hidden_size * merge**2, vision.hidden_size),
                (vision.hidden_size, text.hidden_size),
                (text.hidden_size, text.hidden_size),
            ),
        )

    def _downsample(self) -> int:
        return self.vlm.vision_tower.patch_size * self.vlm.config.spatial_merge_size

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs,
            "image",
            "pixel_values",
            lambda pixels: self.call_with_supported(
                self.vlm.get_image_features,
                pixel_values=pixels,
                image_sizes=inputs.get("image_sizes"),
                vision_feature_layer=inputs.get("vision_feature_layer"),
                return_dict=True,
            ),
        )
        if output is None:
            return []
        features = self.encoder_rows(output)
        sizes = inputs.get("image_sizes")
        step = self._downsample()
        grids = [(h // step, w // step) for h, w in sizes.tolist()] if sizes is not None else [None] * len(features)
        chunks = []
        for rows, grid in zip(features, grids, strict=True):
            parts = (GridPart(0, grid[0], grid[1], grid[1]),) if grid and grid[0] * grid[1] == rows.shape[0] else ()
            chunks.append(VisualChunk("image", rows, [ItemSpec(0, rows.shape[0], parts)]))
        return chunks

    def _call_grids(self, call: dict[str, Any]) -> list[tuple[int, int]] | None:
        """(rows, cols) of patches of each image an encoder call encoded."""
        sizes, patch = call.get("image_sizes"), self.vlm.vision_tower.patch_size
        return [(int(h) // patch, int(w) // patch) for h, w in sizes.tolist()] if sizes is not None else None

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        # no [CLS] and no views: the call's merged tokens are one "view", image after image
        grids, merge = self._call_grids(call), self.vlm.config.spatial_merge_size
        if grids is None:
            return None
        counts = [(h // merge) * (w // merge) for h, w in grids]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [torch.arange(start, start + count) for start, count in zip(starts, counts)], sum(counts)

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """The tower states the projector reads, averaged over each 2x2 group the merger combines (as MMTok does
        on Qwen), in the merged tokens' raster order."""
        grids, merge = self._call_grids(call), self.vlm.config.spatial_merge_size
        layer = call.get("vision_feature_layer") or self.vlm.config.vision_feature_layer
        hidden = output.hidden_states[layer] if output.hidden_states is not None else output.last_hidden_state
        if grids is None or hidden is None or not isinstance(layer, int):
            return None
        groups, start = [], 0
        for h, w in grids:
            patches = hidden[0, start : start + h * w].view(h // merge, merge, w // merge, merge, -1)
            groups.append(patches.mean((1, 3)).flatten(0, 1))
            start += h * w
        return torch.cat(groups)[None]

    def tower_inputs(self, args: tuple, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        pixels = args[0] if args else kwargs["pixel_values"]
        sizes = kwargs.get("image_sizes")
        patch = self.vlm.vision_tower.patch_size
        canvas = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)  # the patch conv runs on the padding too
        if sizes is None:
            sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
        return [
            {"grid": (1, int(h) // patch, int(w) // patch), "embedded_patches": canvas} for h, w in sizes.tolist()
        ]

    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower

    def display_image(self, inputs: dict[str, Any], index: int = 0) -> Tensor:
        height, width = inputs["image_sizes"][index].tolist()  # pixel_values are padded to the batch's largest
        return _to_unit_range(inputs["pixel_values"][index][:, :height, :width].float())
