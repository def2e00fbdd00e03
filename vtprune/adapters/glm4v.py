"""GLM-4.1V and GLM-4.5V (``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``): a Qwen2-VL-like
dynamic-resolution tower (no [CLS]) whose 2x2 merge is a strided convolution followed by a gated merger, and a GLM
decoder with 3-D M-RoPE over half of each head, rotating *adjacent* dims (``rotate_half_llm``).

Images are items as on Qwen2-VL (merged patches in raster order). A video is written as its frames, each a run of
placeholders after its timestamp text, and the tower encodes each frame on its own: each frame is one item spec, as
on Qwen3-VL (one item per video unless ``budget_unit="frame"``). Video frames reuse the *image* placeholder id;
``mm_token_type_ids`` (1 image, 2 video, as the processor returns it) tells them apart. GLM's own forward in
transformers 5.23 / 5.24 cannot take images and videos in one call (its placeholder masks count every placeholder
for both); a wrapped model raises the same error. Positions are the model's 3-D ids on the full prompt, sliced;
recomputed attention rows apply GLM's interleaved partial rotary (``DecoderParts.interleaved_rotary``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.core.adapter import DecoderParts
from vtprune.core.shape import VisionShape

# mm_token_type_ids values of GLM's processor
IMAGE_TYPE, VIDEO_TYPE = 1, 2


class Glm4vAdapter(Qwen3VLAdapter):
    family = "glm4v"
    display_name = "GLM-4.1V / GLM-4.5V"
    model_class_names = (
        "Glm4vForConditionalGeneration",
        "Glm4vModel",
        "Glm4vMoeForConditionalGeneration",
        "Glm4vMoeModel",
    )
    model_types = ("glm4v", "glm4v_moe")
    # each runs the tower itself (unlike Qwen3-VL's get_video_features)
    encoder_methods = ("get_image_features", "get_video_features")

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision = config.vision_config
        hidden, out, merged = vision.hidden_size, vision.out_hidden_size, vision.hidden_size * vision.spatial_merge_size**2
        return VisionShape(
            encoder_input="grid",
            layers=vision.depth,
            hidden=hidden,
            intermediate=out,  # the tower's gated MLP is out_hidden_size wide
            gated_mlp=True,
            patch=vision.patch_size,
            temporal_patch=vision.temporal_patch_size,
            merge=vision.spatial_merge_size,
            # the strided 2x2 convolution (one matrix per merged token), then the merger: proj, gate, up, down
            projector_layers=((merged, out), (out, out), (out, vision.intermediate_size), (out, vision.intermediate_size),
                              (vision.intermediate_size, out)),  # fmt: skip
        )

    def decoder_parts(self, layer: int) -> DecoderParts:
        return dataclasses.replace(super().decoder_parts(layer), interleaved_rotary=True)

    def placeholder_masks(
        self, input_ids: Tensor | None, inputs_embeds: Tensor | None, token_types: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Images' and video frames' placeholders share the image id: ``token_types`` (``mm_token_type_ids``) splits
        them; without it every placeholder is an image's. Embedded prompts use the two ids, as GLM matches them."""
        if input_ids is None:
            return super().placeholder_masks(None, inputs_embeds)
        placeholder = input_ids == self.vlm.config.image_token_id
        if token_types is None:
            return {"image": placeholder, "video": torch.zeros_like(placeholder)}
        return {"image": placeholder & (token_types == IMAGE_TYPE), "video": placeholder & (token_types == VIDEO_TYPE)}

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """The merged tokens' states before the merger (GLM's tower merges with its strided convolution, so its
        ``last_hidden_state`` already has one row per merged token, in raster order)."""
        hidden = output.last_hidden_state
        return None if hidden is None or self._call_grid(call) is None else hidden[None]
