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
from vtprune.core.shape import ExpertsShape, LanguageShape, language_shape


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
    def language_shape(cls, config: Any) -> LanguageShape:
        """The hybrid decoder, for FLOPs: Gated DeltaNet layers (from the config's ``linear_*`` fields), full-attention
        layers whose ``q_proj`` emits ``[query | gate]`` (twice the query width) and, on Qwen3.5-MoE, every layer's
        MoE block (router, routed experts, shared expert and its gate) in place of the dense MLP."""
        text = config.get_text_config()
        experts = None
        if getattr(text, "num_experts", None):
            experts = ExpertsShape(
                experts=text.num_experts,
                per_token=text.num_experts_per_tok,
                intermediate=text.moe_intermediate_size,
                shared_intermediate=getattr(text, "shared_expert_intermediate_size", None) or 0,
            )
        return dataclasses.replace(language_shape(text), gated_query=True, experts=experts)

    def decoder_parts(self, layer: int) -> DecoderParts:
        block = self.decoder_layers[layer]
        layer_type = self.layer_types()[layer]
        if layer_type == "linear_attention":  # observers see the token mixer; nothing recomputes its attention
            mixer = block.linear_attn
            projection = mixer.in_proj_qkv
            return DecoderParts(mixer, projection, projection, block.input_layernorm, block.mlp, layer_type)
        return dataclasses.replace(super().decoder_parts(layer), gated_query=True)  # q_proj emits [query | gate]
