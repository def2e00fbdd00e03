"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's dynamic grids and (interleaved) M-RoPE, plus *deepstack*.

Deepstack: the tower's blocks in ``deepstack_visual_indexes`` each emit merged features of every visual token, and
the language model adds feature set ``i`` to the hidden states of the visual tokens after decoder layer ``i``
(``visual_pos_masks`` says where). Pruning must keep the two in step:

* before the LLM, every deepstack tensor keeps the rows of the kept tokens (``VisualChunk.extras``);
* inside the LLM, at a layer within the deepstack range (FastV's K=2 on a 3-set model), the remaining additions go
  to the kept tokens only: the adapter patches the language model's ``_deepstack_process`` to remap
  ``visual_pos_masks`` and the feature rows onto the shortened sequence.

A video's frames are separate runs of placeholders, each after its timestamp text; each frame is one item spec (as
for Qwen2-VL: one item per video unless ``budget_unit="frame"``; a frame may lose every token, its timestamp and
markers stay). Positions are the model's own 3-D ids on the full prompt, sliced.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from torch import Tensor

from vtprune.adapters.qwen_vl import QwenVLAdapter
from vtprune.core.shape import VisionShape

DEEPSTACK = "deepstack_features"


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    display_name = "Qwen3-VL"
    model_class_names = (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeModel",
    )
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    # get_video_features calls get_image_features: observing both would see every video twice
    encoder_methods = ("get_image_features",)

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision = config.vision_config
        merged = vision.hidden_size * vision.spatial_merge_size**2
        return VisionShape(
            encoder_input="grid",
            layers=vision.depth,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            temporal_patch=vision.temporal_patch_size,
            merge=vision.spatial_merge_size,
            projector_in=merged,
            projector_hidden=merged,
            projector_out=vision.out_hidden_size,
            # one merger per deepstack block besides the final one, each as large as the final merger (none on
            # Qwen3.5, built on this adapter)
            projectors=1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()),
        )

    def _chunk_extras(self, output: Any, index: int) -> dict[str, list[Tensor]]:
        """Entry ``index``'s rows of every deepstack feature set (none on Qwen3.5)."""
        deepstack = getattr(output, DEEPSTACK, None) or []
        return {DEEPSTACK: [layer[index] for layer in deepstack]} if deepstack else {}

    def _grids_from_positions(
        self, inputs: dict[str, Any], modality: str, counts: list[int]
    ) -> list[tuple[int, int, int] | None]:
        """(frames, rows, cols) per image or video. A video's frames are separate placeholder runs with their own
        positions, so each run is read alone and the frames must agree."""
        positions = inputs.get("position_ids")
        if positions is None or positions.ndim != 3:
            return [None] * len(counts)
        runs = collections.deque(self.placeholder_runs(inputs, modality))
        grids: list[tuple[int, int, int] | None] = []
        for count in counts:
            left, shapes, frames = count, set(), 0
            while left > 0 and runs:
                sample, begin, length = runs.popleft()
                if length > left:  # a run shared with the next entry: split where its rows end
                    runs.appendleft((sample, begin + left, length - left))
                    length = left
                thw = positions[-3:, sample, begin : begin + length]
                height, width = int(thw[1].unique().numel()), int(thw[2].unique().numel())
                shapes.add((height, width) if height * width == length else None)
                left, frames = left - length, frames + 1
            grids.append((frames, *shapes.pop()) if left == 0 and len(shapes) == 1 and None not in shapes else None)
        return grids

    def follow_kept_rows(self, patch: Callable[[Any, str, Any], None], rows_now: Callable[[], Tensor | None]) -> None:
        """Route deepstack additions to the tokens an in-LLM stage kept (see the module docstring); nothing to do
        for the families built on this adapter that have no deepstack (Qwen3.5, GLM-4V)."""
        language_model = self.language_model
        original = getattr(language_model, "_deepstack_process", None)
        if original is None:
            return

        def deepstack_process(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            rows = rows_now()
            if rows is None or hidden_states.shape[1] == visual_pos_masks.shape[1]:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            masks = visual_pos_masks.to(rows.device)
            # visual_embeds hold one row per True of visual_pos_masks, in row-major order
            embed_row = (masks.flatten().long().cumsum(0) - 1).view_as(masks)
            source = rows.clamp(min=0)
            kept = masks.gather(1, source) & (rows >= 0)
            kept_rows = embed_row.gather(1, source)[kept]
            return original(hidden_states, kept, visual_embeds[kept_rows.to(visual_embeds.device)])

        patch(language_model, "_deepstack_process", deepstack_process)
