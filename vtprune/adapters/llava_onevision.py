"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's any-resolution layout on a SigLIP tower.

Images: a base view grid, then the unpadded high-resolution grid with an ``image_newline`` token ending each row
(``anyres_max_9``: a grid larger than 9 views' worth is first shrunk by bilinear interpolation). The tower has no
[CLS] token, so every tower row is a patch whatever ``vision_feature_select_strategy`` says, and [CLS]-attention
methods refuse the family.

Videos: each frame's grid is pooled 2x2 (bilinear, to ``ceil(side / 2)`` squared tokens), the frames follow each
other and one newline ends the video. Each frame is one item spec (joined into one item per video unless
``budget_unit="frame"``); the final newline is a structural token of the last frame. The features reach the model as
one ``[N, D]`` tensor (its forward flattens what it is given).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches,
)

from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.core.adapter import ItemSpec, VisualChunk
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    display_name = "LLaVA-OneVision"
    model_class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    model_types = ("llava_onevision",)
    raw_visual_inputs = ("pixel_values", "pixel_values_videos")
    encoder_methods = ("get_image_features", "get_video_features")
    has_cls_token = False
    cls_position = None
    # SigLIP's attention maps onto image tokens and, pooled as the features are, onto video frames' tokens; an
    # any-res grid shrunk by interpolation has no per-token signals (image_sources returns None)
    tower_attention = True

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        shape = super().vision_shape(config)
        return VisionShape(**{**shape.__dict__, "cls_token": False})

    def visual_token_ids(self) -> dict[str, int]:
        config = self.vlm.config
        return {"image": config.image_token_id, "video": config.video_token_id}

    # SigLIP has no [CLS]: the tower's rows are the patches under either strategy
    def _select_strategy(self, inputs: dict[str, Any]) -> str:
        return "default"

    def _pooled_side(self) -> int:
        return math.ceil(self._patch_grid() / 2)

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        if call.get("pixel_values_videos") is not None:
            return self._video_sources(call)
        image_sizes = call.get("image_sizes")
        if image_sizes is None:
            return None
        config, side = self.vlm.config, self._patch_grid()
        per_view = side * side
        views = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes.tolist()
        ]
        # Pack a map of tower indices the way the model packs features; newlines carry -1.
        maps, offset = [], 0
        for count in views:
            view_ids = torch.arange(offset, offset + count, dtype=torch.float64)[:, None]
            maps.append((view_ids * per_view + torch.arange(per_view, dtype=torch.float64)[None])[..., None])
            offset += count
        ratio = call.get("vision_aspect_ratio") or config.vision_aspect_ratio
        packed, _ = self.vlm.pack_image_features(
            maps, image_sizes.cpu(), image_newline=torch.tensor([-1.0], dtype=torch.float64), vision_aspect_ratio=ratio
        )
        sources = [p[:, 0] for p in packed]
        if any(not bool((s == s.round()).all()) for s in sources):
            return None  # an any-res grid shrunk by interpolation: its tokens blend several patches
        return [s.round().long() for s in sources], per_view

    def vision_row_values(self, call: dict[str, Any], values: Tensor) -> Tensor:
        """Per view, the values of its rows (no [CLS]); a video's frames pooled 2x2 as the model pools them."""
        side = self._patch_grid()
        values = values.view(-1, side * side)
        if call.get("pixel_values_videos") is None:
            return values
        pooled = self._pooled_side()
        return F.interpolate(values.view(-1, 1, side, side), size=[pooled, pooled], mode="bilinear").flatten(1)

    def _video_sources(self, call: dict[str, Any]) -> tuple[list[Tensor], int]:
        """Each frame is one "view" of pooled tokens (see :meth:`encoder_states`); the final newline has none."""
        videos, frames = call["pixel_values_videos"].shape[:2]
        per_frame = self._pooled_side() ** 2
        sources, frame = [], 0
        for _ in range(videos):
            tokens = torch.arange(frame * per_frame, (frame + frames) * per_frame)
            sources.append(torch.cat([tokens, torch.tensor([-1])]))
            frame += frames
        return sources, per_frame

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """Pre-projector features per view; for a video, pooled per frame as the model pools the projected ones."""
        states = super().encoder_states(call, output)
        if states is None or call.get("pixel_values_videos") is None:
            return states
        side, pooled = self._patch_grid(), self._pooled_side()
        grid = states.view(states.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=[pooled, pooled], mode="bilinear").permute(0, 2, 3, 1).flatten(1, 2)

    def _video_chunks(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs,
            "video",
            "pixel_values_videos",
            lambda pixels: self.call_with_supported(
                self.vlm.get_video_features,
                pixel_values_videos=pixels,
                vision_feature_layer=inputs.get("vision_feature_layer"),
                vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
                return_dict=True,
            ),
        )
        if output is None:
            return []
        features = self.encoder_rows(output)
        pooled = self._pooled_side()
        per_frame = pooled * pooled
        chunks = []
        for rows in features:
            frames = (rows.shape[0] - 1) // per_frame
            if frames * per_frame + 1 != rows.shape[0]:
                raise ValueError(
                    f"a LLaVA-OneVision video has {rows.shape[0]} feature rows, not frames x {per_frame} + 1 newline"
                )
            part = (GridPart(0, pooled, pooled, pooled),)
            items = [ItemSpec(t * per_frame, per_frame, part) for t in range(frames - 1)]
            newline = torch.zeros(per_frame + 1, dtype=torch.bool)
            newline[-1] = True
            items.append(ItemSpec((frames - 1) * per_frame, per_frame + 1, part, newline))
            chunks.append(VisualChunk("video", rows, items))
        return chunks

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        return super().encode(inputs) + self._video_chunks(inputs)

    def encoder_outputs(
        self, features: dict[str, list[Tensor]], extras: dict[str, dict[str, list[list[Tensor]]]] | None = None
    ) -> dict[str, BaseModelOutputWithPooling]:
        outputs = super().encoder_outputs(features, extras)
        if "video" in outputs:  # the forward flattens video features: kept videos of any length as one [N, D]
            outputs["video"].pooler_output = torch.cat(list(outputs["video"].pooler_output))
        return outputs
