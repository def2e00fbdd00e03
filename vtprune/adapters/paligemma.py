"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a SigLIP tower (no [CLS]) whose every patch is
one token after a linear projector, and a Gemma (PaliGemma) or Gemma 2 (PaliGemma 2: sliding and full layers,
soft-capped attention logits) decoder behind a **prefix-LM** mask.

* Each image is one item on its square patch grid (256 tokens at 224 px).
* The prompt (images, then the text prefix) is the bidirectional prefix: ``token_type_ids == 0`` puts every
  prefix token in one block that attends to the whole block; a suffix (``token_type_ids == 1``: training targets,
  decoded tokens) is causal. A pre-LLM stage hands the model the kept rows of ``token_type_ids``, so the model
  builds that mask itself; after an in-LLM stage the kept tokens keep their block (``Layout.blocks``) and the
  adapter rebuilds the masks as transformers builds them. Without ``token_type_ids`` the model is causal, and so
  is everything here.
* Recomputed attention rows see the same keys (bidirectional within the prefix), so methods that average several
  query rows (FastV's ``query="all"``, SparseVLM's text raters) read the attention the model computes; Gemma 2's
  logit soft-capping is applied.
* Positions are 1-based, as PaliGemma numbers them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk, whole_views
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class PaliGemmaAdapter(Adapter):
    family = "paligemma"
    display_name = "PaliGemma"
    model_class_names = ("PaliGemmaForConditionalGeneration", "PaliGemmaModel")
    model_types = ("paligemma",)
    has_cls_token = False
    cls_position = None
    encoder_output_layout = "tensor"

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision = config.vision_config
        return VisionShape(
            encoder_input="views",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            image_size=vision.image_size,
            projector_layers=((vision.hidden_size, config.projection_dim),),
            fixed_views=1,
        )

    def _side(self) -> int:
        vision = self.vlm.config.vision_config
        return vision.image_size // vision.patch_size

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs, "image", "pixel_values", lambda pixels: self.vlm.get_image_features(pixels, return_dict=True)
        )
        if output is None:
            return []
        side = self._side()
        return [
            VisualChunk("image", rows, [ItemSpec(0, rows.shape[0], (GridPart(0, side, side, side),))])
            for rows in self.encoder_rows(output)
        ]

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        return whole_views(call["pixel_values"].shape[0], self._side() ** 2)  # every patch a token

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        return output.last_hidden_state

    def project(self, features: Tensor) -> Tensor:
        return self.vlm.multi_modal_projector(features)

    def bidirectional_blocks(self, inputs: dict[str, Any], visual: Tensor) -> Tensor | None:
        """The prefix (``token_type_ids == 0``) is one block, as the model builds it; none without token types
        (then the model, too, is causal)."""
        types = inputs.get("token_type_ids")
        return None if types is None else torch.where(types == 0, 0, -1).to(visual.device)

    def attention_masks(
        self, hidden_states: Tensor, attention_mask: Tensor, cache: Any, layer: int, blocks: Tensor | None = None
    ) -> dict[str, Any]:
        """As PaliGemma builds them: causal OR same block, in sliding layers (PaliGemma 2) the window OR same block."""
        if blocks is None or not bool((blocks >= 0).any()):  # decoding, or no prefix: causal
            return super().attention_masks(hidden_states, attention_mask, cache, layer)
        masks = {}
        for layer_type in sorted(set(self.layer_types())):
            build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
            masks[layer_type] = build(
                self.text_config, hidden_states, attention_mask, cache, block_sequence_ids=blocks,
                layer_idx=self.mask_layer(layer, layer_type),
            )  # fmt: skip
        return masks

    def prefill_positions(self, inputs: dict[str, Any], batch: int, length: int) -> Tensor:
        if inputs.get("position_ids") is not None:
            return super().prefill_positions(inputs, batch, length)
        return super().prefill_positions(inputs, batch, length) + 1

    def decode_positions(self, inputs: dict[str, Any], past_length: int, query_length: int, batch: int) -> Tensor:
        return super().decode_positions(inputs, past_length, query_length, batch) + 1
