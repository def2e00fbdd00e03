"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): InternViT tiles, 2x2 pixel shuffle, MLP projector, a
Qwen2 / Qwen3 decoder with 1-D RoPE.

The processor cuts each image into 448 px tiles (plus a thumbnail) and the model encodes every tile on its own:
its output is one ``[tiles, 256, D]`` tensor for the whole batch, with nothing saying which tiles form an image.
The prompt does: each image is one run of ``<IMG_CONTEXT>`` placeholders (between ``<img>`` and ``</img>``), 256 per
tile. The adapter regroups the tiles by those runs, so the budget applies **per image**, each tile being one
square grid of the image's item; tower signals are looked up per tile and joined.

Each token is a 2x2 group of patches (pixel shuffle concatenates their channels): the encoder features MMTok-like
methods read are the group means, and [CLS] attention is not mapped onto groups yet, so [CLS] methods refuse.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from vtprune.core.adapter import (
    Adapter,
    VisualChunk,
    pixel_shuffle_groups,
    tiled_chunks,
    whole_views,
)
from vtprune.core.shape import VisionShape


def _square(value: int | list[int] | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else int(value[0])


class InternVLAdapter(Adapter):
    family = "internvl"
    display_name = "InternVL"
    model_class_names = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)
    has_cls_token = False  # the tower has one, but its attention is not mapped onto pixel-shuffled tokens yet
    cls_position = None
    no_cls_reason = "maps no [CLS] attention onto its pixel-shuffled (2x2 patch) tokens yet"
    per_token_projector = False  # one token concatenates 2x2 patches
    encoder_output_layout = "tensor"

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision, text = config.vision_config, config.get_text_config()
        shuffled = vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        return VisionShape(
            encoder_input="views",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=_square(vision.patch_size),
            image_size=_square(vision.image_size),
            cls_token=True,
            projector_layers=((shuffled, text.hidden_size), (text.hidden_size, text.hidden_size)),
            projected_per_view=config.image_seq_length,
        )

    def _feature_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        config = self.vlm.config
        return {
            "vision_feature_layer": inputs.get("vision_feature_layer") or config.vision_feature_layer,
            "vision_feature_select_strategy": inputs.get("vision_feature_select_strategy")
            or config.vision_feature_select_strategy,
        }

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs,
            "image",
            "pixel_values",
            lambda pixels: self.vlm.get_image_features(pixels, return_dict=True, **self._feature_options(inputs)),
        )
        if output is None:
            return []
        tiles = self.encoder_rows(output)
        per_tile = tiles[0].shape[0]
        runs = [length for _, _, length in self.placeholder_runs(inputs)]  # one run per image
        if sum(runs) != per_tile * len(tiles) or any(run % per_tile for run in runs):
            raise ValueError(
                f"InternVL: the prompt's image placeholder runs {runs} do not split into the {len(tiles)} encoded "
                f"tiles of {per_tile} tokens each; the processor and the model disagree"
            )
        return tiled_chunks(tiles, [run // per_tile for run in runs])

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        # every tile is one view of its own tokens
        tiles = self.encoder_rows(output)
        return whole_views(len(tiles), tiles[0].shape[0])

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """Per tile, the mean of the tower states each token concatenates (its 2x2 patch group)."""
        options = self._feature_options(call)
        layer = options["vision_feature_layer"]
        if not isinstance(layer, int):
            return None
        hidden = output.last_hidden_state if layer == -1 else (output.hidden_states or [None])[layer]
        if hidden is None:
            return None
        if options["vision_feature_select_strategy"] == "default":
            hidden = hidden[:, 1:]
        shuffle = functools.partial(self.vlm.pixel_shuffle, scale_factor=self.vlm.config.downsample_ratio)
        groups = pixel_shuffle_groups(shuffle, int(hidden.shape[1] ** 0.5)).to(hidden.device)
        return hidden[:, groups].mean(2)

    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower
