"""Qwen3.5 and Qwen3.5-MoE (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's vision side without deepstack, and a
hybrid decoder of Gated DeltaNet linear-attention layers and gated full-attention layers (``q_proj`` emits
``[query | gate]`` per head; partial rotary, 0.25 of each head).

Images and video frames are items as on Qwen3-VL; positions are the model's 3-D ids, sliced. A linear-attention
layer keeps a recurrent state instead of keys and values, so pruning inside the LLM is consistent by construction:
the layers after the pruning point simply run (and keep their state) over the kept tokens, as if the prompt had
been born short; their only mask is the 2-D padding mask, rebuilt for the shorter sequence. Attention-scored
methods read a full-attention layer (a stage whose ``attention_from`` is a linear layer is refused).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.core.adapter import DecoderParts
from vtprune.core.shape import VisionShape


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    display_name = "Qwen3.5"
    model_class_names = (
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5Model",
        "Qwen3_5MoeForConditionalGeneration",
        "Qwen3_5MoeModel",
    )
    model_types = ("qwen3_5", "qwen3_5_moe")

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        raise NotImplementedError(
            "Qwen3.5 has no FLOPs model yet: its Gated DeltaNet linear-attention layers are not counted by "
            "vtprune.eval.flops (pruning itself works)"
        )

    def decoder_parts(self, layer: int) -> DecoderParts:
        block = self.decoder_layers[layer]
        layer_type = self.layer_types()[layer]
        if layer_type == "linear_attention":  # observers see the token mixer; nothing recomputes its attention
            mixer = block.linear_attn
            projection = mixer.in_proj_qkv
            return DecoderParts(mixer, projection, projection, block.input_layernorm, block.mlp, layer_type)
        return dataclasses.replace(super().decoder_parts(layer), gated_query=True)  # q_proj emits [query | gate]
