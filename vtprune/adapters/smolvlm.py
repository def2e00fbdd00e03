"""SmolVLM and Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``): a SigLIP tower
(no [CLS]) run on square crops, pixel shuffle (a token concatenates ``scale_factor``² patches), a linear connector
and a Llama-style decoder (under ``text_model``) with 1-D RoPE.

The processor cuts each image into a grid of crops plus a global (downscaled whole-image) crop and writes one run of
``<image>`` placeholders per crop, each after its ``<fake_token_around_image><row_i_col_j>`` tags; the global crop
comes last, after ``<global-img>``. The model's encoder output is one tensor per *sample*. The adapter splits it
into crops and regroups the crops into images, so the budget applies **per image**, each crop being one square grid
of the image's item: a run whose preceding token is the one before every sample's last run (``<global-img>``;
the model config does not carry its id) closes an image. A video's frames are single global crops, so each frame is
its own item. Prompts given only as ``inputs_embeds`` have no tags to read: there each crop is its own item.

Encoder features that MMTok-like methods read are the means of each token's patch group; [CLS] methods refuse.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from vtprune.core.adapter import (
    Adapter,
    VisualChunk,
    _to_unit_range,
    pixel_shuffle_groups,
    tiled_chunks,
    whole_views,
)
from vtprune.core.shape import VisionShape


class SmolVLMAdapter(Adapter):
    family = "smolvlm"
    display_name = "SmolVLM / Idefics3"
    model_class_names = (
        "SmolVLMForConditionalGeneration",
        "SmolVLMModel",
        "Idefics3ForConditionalGeneration",
        "Idefics3Model",
    )
    model_types = ("smolvlm", "idefics3")
    raw_visual_inputs = ("pixel_values", "pixel_attention_mask")
    has_cls_token = False
    cls_position = None
    per_token_projector = False  # one token concatenates a group of patches

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision, text = config.vision_config, config.text_config
        return VisionShape(
            encoder_input="views",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            image_size=vision.image_size,
            projector_layers=((vision.hidden_size * config.scale_factor**2, text.hidden_size),),
            projected_per_view=(vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2,
        )

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.text_model

    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_model

    @property
    def _tokens_per_crop(self) -> int:
        return int(self.vlm.image_seq_len)

    def encoder_entries(self, pooler_output: Tensor | list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """The model returns each sample's crops as one tensor (empty for a sample without images): one entry per
        crop."""
        per_sample = self.per_image_features(pooler_output)
        return [crop for rows in per_sample if rows.shape[0] for crop in rows.split(self._tokens_per_crop)]

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs,
            "image",
            "pixel_values",
            lambda pixels: self.vlm.get_image_features(pixels, inputs.get("pixel_attention_mask"), return_dict=True),
        )
        if output is None:
            return []
        crops = self.encoder_rows(output)
        images = self._crops_per_image(inputs)
        per_crop = self._tokens_per_crop
        if sum(images) != len(crops) or any(crop.shape[0] != per_crop for crop in crops):
            raise ValueError(
                f"{self.display_name}: the prompt's placeholder runs ({sum(images)} crops of {per_crop} tokens) do not "
                f"match the {len(crops)} encoded crops; the processor and the model disagree"
            )
        return tiled_chunks(crops, images)

    def _crops_per_image(self, inputs: dict[str, Any]) -> list[int]:
        """Crops of each image in prompt order: runs of placeholders up to one after ``<global-img>`` (see the
        module docstring); one per run where there are no ids to read."""
        runs = self.placeholder_runs(inputs)
        input_ids = inputs.get("input_ids")
        if input_ids is None or not runs:
            return [1] * len(runs)
        before = [int(input_ids[sample, start - 1]) if start > 0 else -1 for sample, start, _ in runs]
        last_of_sample = {sample: index for index, (sample, _, _) in enumerate(runs)}
        closing = {before[index] for index in last_of_sample.values()}
        if len(closing) != 1:  # not the processor's layout: no image grouping to trust
            return [1] * len(runs)
        global_tag = closing.pop()
        images, count = [], 0
        for tag in before:
            count += 1
            if tag == global_tag:
                images.append(count)
                count = 0
        return images

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        return whole_views(len(self.encoder_rows(output)), self._tokens_per_crop)  # every crop is one view

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """Per crop, the mean of the tower states each token concatenates (its patch group)."""
        hidden = output.last_hidden_state
        if hidden is None:
            return None
        shuffle = functools.partial(self.vlm.connector.pixel_shuffle, scale_factor=self.vlm.config.scale_factor)
        groups = pixel_shuffle_groups(shuffle, int(hidden.shape[1] ** 0.5), flat=True).to(hidden.device)
        return hidden[:, groups].mean(2)

    def display_image(self, inputs: dict[str, Any], index: int = 0) -> Tensor:
        """Image ``index``'s global crop (the whole image, downscaled)."""
        pixels = inputs["pixel_values"].flatten(0, 1)
        real = pixels[pixels.flatten(1).ne(0).any(1)]  # the model drops all-zero padding crops the same way
        last_crop = sum(self._crops_per_image(inputs)[: index + 1]) - 1
        return _to_unit_range(real[last_crop].float())
