"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower (no [CLS]), average-pooled to a fixed square of
``mm_tokens_per_image`` tokens (256 = 16 x 16) and projected; a decoder of sliding-window and full-attention layers.

* Each image (or pan-and-scan crop, which the processor gives its own placeholders) is one item on a square grid.
* Sliding and full layers rotate with different tables (``rotary_emb(x, positions, layer_type)``); the engine asks
  for the table of each layer's type.
* Image tokens attend to each other bidirectionally within their image (``token_type_ids``): masks rebuilt after
  an in-LLM stage keep that, from which slots are still visual (full layers: causal OR same image; sliding layers:
  window AND (causal OR same image), as transformers builds them). A sliding window counts slots, so after pruning
  it spans the last W kept tokens, as in any KV-pruned sliding-window model.
* The projector pools 4 x 4 patches per token, so there is no per-token projector (``pool(where='before')`` and
  other merge-before-projector methods refuse) and no tower signal per token.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    sliding_window_overlay,
)
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk, whole_views
from vtprune.core.compat import build_mask
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class Gemma3Adapter(Adapter):
    family = "gemma3"
    display_name = "Gemma 3"
    model_class_names = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    model_types = ("gemma3",)
    has_cls_token = False
    cls_position = None
    per_token_projector = False
    encoder_output_layout = "tensor"

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision, text = config.vision_config, config.get_text_config()
        return VisionShape(
            encoder_input="views",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            image_size=vision.image_size,
            # pooled tokens only: RMSNorm, then one matrix into the LLM's width
            projector_in=vision.hidden_size,
            projector_hidden=text.hidden_size,
            projector_out=0,
            projected_per_view=config.mm_tokens_per_image,
            fixed_views=1,
        )

    def _side(self) -> int:
        return int(self.vlm.config.mm_tokens_per_image**0.5)

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        output = self.encoder_output(
            inputs, "image", "pixel_values", lambda pixels: self.vlm.get_image_features(pixels, return_dict=True)
        )
        if output is None:
            return []
        features = self.encoder_rows(output)
        side = self._side()
        chunks = []
        for rows in features:
            grid = (GridPart(0, side, side, side),) if rows.shape[0] == side * side else ()
            chunks.append(VisualChunk("image", rows, [ItemSpec(0, rows.shape[0], grid)]))
        return chunks

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        # each image is one view; its tokens are the pooled cells in raster order (see encoder_states)
        return whole_views(call["pixel_values"].shape[0], self._side() ** 2)

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """The tower's last states average-pooled onto the token grid, as the projector pools them before its
        norm and matrix."""
        hidden = output.last_hidden_state
        if hidden is None:
            return None
        patches, side = int(hidden.shape[1] ** 0.5), self._side()
        grid = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, patches, patches)
        return F.avg_pool2d(grid, patches // side).flatten(2).transpose(1, 2)

    def rotary(self, hidden_states: Tensor, positions: Tensor, layer_type: str = "full_attention") -> tuple[Tensor, Tensor]:
        return self.language_model.rotary_emb(hidden_states, positions, layer_type)

    def bidirectional_blocks(self, inputs: dict[str, Any], visual: Tensor) -> Tensor | None:
        """Each image's tokens are one block (as the model numbers them from its image tokens)."""
        return get_block_sequence_ids_for_mask(visual.long(), device=visual.device)

    def attention_masks(
        self, hidden_states: Tensor, attention_mask: Tensor, cache: Any, layer: int, blocks: Tensor | None = None
    ) -> dict[str, Any]:
        if blocks is None or not bool((blocks >= 0).any()):  # decoding, or no block: causal
            return super().attention_masks(hidden_states, attention_mask, cache, layer)
        config = self.text_config
        # key columns beyond these rows (a cache) are never in an image block of these rows
        blocks = F.pad(blocks, (0, attention_mask.shape[-1] - blocks.shape[-1]), value=-1)
        masks = {}
        for layer_type in sorted(set(self.layer_types())):
            sized_by = self.mask_layer(layer, layer_type)
            if layer_type == "full_attention":
                masks[layer_type] = create_causal_mask(
                    config, hidden_states, attention_mask, cache, or_mask_function=blockwise_overlay(blocks),
                    layer_idx=sized_by,
                )  # fmt: skip
            elif layer_type == "sliding_attention":
                masks[layer_type] = create_causal_mask(
                    config, hidden_states, attention_mask, cache, or_mask_function=blockwise_overlay(blocks),
                    and_mask_function=sliding_window_overlay(config.sliding_window), layer_idx=sized_by,
                )  # fmt: skip
            else:
                masks[layer_type] = build_mask(layer_type, config, hidden_states, attention_mask, cache, sized_by)
        return masks
