"""Full-size configs of the supported families, written out (no download), for FLOPs estimates on ``meta``.

Sizes as published on the Hugging Face hub for llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf,
llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf, Qwen/Qwen2-VL-7B-Instruct,
Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct, OpenGVLab/InternVL3-8B-hf and google/gemma-3-12b-it (written from their config.json
files, not downloaded here; the parameter counts in tests/eval/test_flops.py check them against the model cards).
``qwen3.5-9b`` is reconstructed instead (its config.json was not at hand): see the comment at its entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14
)
VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32064, max_position_embeddings=4096,
)  # fmt: skip
VICUNA_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    vocab_size=32064, max_position_embeddings=4096,
)  # fmt: skip
QWEN2_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)  # fmt: skip

SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, vision_use_head=False
)  # fmt: skip

REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {"family": "llava", "vision": CLIP_L_336, "text": VICUNA_7B},
    "llava-1.5-13b": {"family": "llava", "vision": CLIP_L_336, "text": VICUNA_13B},
    "llava-next-7b": {
        "family": "llava_next",
        "vision": CLIP_L_336,
        "text": VICUNA_7B,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    },
    "qwen2-vl-7b": {
        "family": "qwen2_vl",
        "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
        "text": QWEN2_7B_TEXT,
    },  # fmt: skip
    "qwen2.5-vl-7b": {
        "family": "qwen2_5_vl",
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
        "text": QWEN2_7B_TEXT,
    },  # fmt: skip
    "qwen3-vl-8b": {
        "family": "qwen3_vl",
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]),
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
    },  # fmt: skip
    "llava-onevision-7b": {
        "family": "llava_onevision",
        "vision": dict(SIGLIP_SO400M, num_hidden_layers=26, image_size=384),
        "text": dict(QWEN2_7B_TEXT, vocab_size=152128, rope_scaling=None),
        # 384 px tiles, grids from 1 x 1 to 6 x 6
        "image_grid_pinpoints": [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)],
    },
    "internvl3-8b": {
        "family": "internvl",
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14], attention_bias=True),
        "text": dict(QWEN2_7B_TEXT, vocab_size=151674, rope_scaling=None),
    },  # fmt: skip
    # Qwen3.5-9B, reconstructed: the text and vision sizes are transformers' Qwen3_5TextConfig / Qwen3_5VisionConfig
    # defaults, which their docstring calls "the Qwen3.5-9B style configuration" (32 layers of width 4096, 3 Gated
    # DeltaNet layers to 1 gated full-attention layer, 16 query / 4 KV heads of 256, linear attention 16 key / 32
    # value heads of 128, conv kernel 4, MLP 12288, vocabulary 248320; a 27-block, 1152-wide tower with patch 16);
    # third-party summaries of the checkpoint give the same text sizes. Assumed, not verified against the hub's
    # config.json: untied embeddings (the config default; a third-party GGUF summary's 8.95 B text parameters match
    # the 7.94 B decoder + 1.02 B LM head built here), the merger's output width equal to the text width 4096
    # (the vision default 3584 could not feed a 4096-wide decoder), and the rotary settings (64 of 256 head dims
    # rotated in interleaved M-RoPE sections [11, 11, 10], theta 1e7, 262144 positions: third-party summaries;
    # neither FLOPs nor the parameter count depend on them).
    "qwen3.5-9b": {
        "family": "qwen3_5",
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304),
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                     num_key_value_heads=4, head_dim=256, vocab_size=248320, max_position_embeddings=262144,
                     layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8, linear_num_key_heads=16,
                     linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                     linear_conv_kernel_dim=4, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                                      "mrope_interleaved": True, "partial_rotary_factor": 0.25}),
    },  # fmt: skip
    # GLM-4.1V-9B: transformers' Glm4vConfig defaults, which its docstring gives as the GLM-4.1V-9B-Thinking
    # configuration (40 layers of 4096, 32 heads / 2 KV heads, MLP 13696, vocabulary 151552; a 24-block, 1536-wide
    # tower with patch 14 merging to 4096); the rotary settings (theta 10000, M-RoPE sections [8, 12, 12] over half
    # of each 128-wide head) are assumed, and neither FLOPs nor the parameter count depend on them.
    "glm-4.1v-9b": {
        "family": "glm4v",
        "vision": dict(depth=24, hidden_size=1536, intermediate_size=13696, num_heads=12, out_hidden_size=4096,
                       patch_size=14, image_size=336, spatial_merge_size=2, temporal_patch_size=2),
        "text": dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=2, vocab_size=151552, max_position_embeddings=65536,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                      "partial_rotary_factor": 0.5}),
    },  # fmt: skip
    "gemma-3-12b": {
        "family": "gemma3",
        "vision": dict(SIGLIP_SO400M, num_hidden_layers=27, image_size=896),
        "text": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                     sliding_window=1024, max_position_embeddings=131072,
                     layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8),
    },  # fmt: skip
}


def reference_config(name: str) -> Any:
    """The transformers config of a full-size reference model (see :data:`REFERENCE_CONFIGS`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_CONFIGS)}")
    spec = REFERENCE_CONFIGS[name]
    family = spec["family"]
    if family in ("llava", "llava_next"):
        common = dict(
            vision_config=CLIPVisionConfig(**spec["vision"]),
            text_config=LlamaConfig(**spec["text"]),
            image_token_index=32000,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=spec["image_grid_pinpoints"])
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**spec["vision"]), text_config=Qwen2Config(**spec["text"]),
            image_token_index=151646, video_token_index=151647, vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=spec["image_grid_pinpoints"],
            vision_aspect_ratio="anyres_max_9",
        )  # fmt: skip
    if family == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        return InternVLConfig(
            vision_config=InternVLVisionConfig(**spec["vision"]), text_config=Qwen2Config(**spec["text"]),
            image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False,
        )  # fmt: skip
    if family == "gemma3":
        from transformers import Gemma3Config, SiglipVisionConfig

        return Gemma3Config(
            vision_config=SiglipVisionConfig(**spec["vision"]), text_config=dict(spec["text"]), mm_tokens_per_image=256,
            image_token_index=262144, boi_token_index=255999, eoi_token_index=256000,
        )  # fmt: skip
    special = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=dict(spec["text"]), vision_config=dict(spec["vision"]), **special)
    if family == "glm4v":  # its own special-token ids are the config's defaults
        from transformers import Glm4vConfig

        return Glm4vConfig(text_config=dict(spec["text"]), vision_config=dict(spec["vision"]))
    if family == "qwen3_5":  # its own special-token ids are the config's defaults
        from transformers import Qwen3_5Config

        return Qwen3_5Config(text_config=dict(spec["text"]), vision_config=dict(spec["vision"]), tie_word_embeddings=False)
    config_class = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
    return config_class(text_config=dict(spec["text"]), vision_config=dict(spec["vision"]), **special)


def meta_model(name: str) -> nn.Module:
    """A full-size reference model on the ``meta`` device: real module structure, no weight memory."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(reference_config(name))
