"""Tiny random-initialised VLMs built from the real transformers configs, and batches for them.

No weights are downloaded: every family is built from its own config class with small sizes, so tests, the demo
and benchmarks exercise the real model code (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FAMILIES = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "mistral3",
    "internvl", "glm4v", "smolvlm", "paligemma",
)
VOCAB = 128
IMAGE_TOKEN = VOCAB - 1
VIDEO_TOKEN = VOCAB - 2
VISION_START = VOCAB - 3
VISION_END = VOCAB - 4
# Gemma 3 writes <start_of_image> / <end_of_image> around each image's placeholders; Mistral 3 [IMG_BREAK] after
# each row of an image and [IMG_END] after the last
IMAGE_START, IMAGE_END = VISION_START, VISION_END
IMAGE_BREAK = VISION_START
# SmolVLM writes each crop after <fake_token_around_image><row_i_col_j> (one tag id here for every row and column),
# rows of crops end with a newline, and the image's global crop comes last, after <global-img>
FAKE_AROUND_IMAGE, GLOBAL_IMAGE, CROP_TAG, NEWLINE = VISION_START, VISION_END, VOCAB - 5, VOCAB - 6
PAD_TOKEN = 0
# families with Qwen2-VL's patch grids (pixel_values [patches, C * 2 * 2 * 2] + image_grid_thw) and 3-D M-RoPE
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")
# families with LLaVA-NeXT's any-resolution views: pixel_values [images, views, C, H, W] + image_sizes
ANY_RES = ("llava_next", "llava_onevision")
# Text tokens are drawn from [1, TEXT_TOKENS) so they never collide with the special ids above.
TEXT_TOKENS = VOCAB - 8


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    sliding_window: int = 24,
    gemma2: bool = False,
) -> nn.Module:
    """A small random model of ``family`` (one of :data:`FAMILIES`), in eval mode. ``sliding_window``: Gemma 3's
    (and PaliGemma 2's) sliding layers' window (shorter than the test prompts, so windows matter); ``gemma2``:
    PaliGemma 2 (Gemma 2 decoder: sliding and full layers, soft-capped logits; eager attention only)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    heads = 4
    text = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in ("llava", "llava_next"):
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4
        )
        common = dict(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        if family == "llava":
            model = LlavaForConditionalGeneration(LlavaConfig(**common))
        else:
            config = LlavaNextConfig(**common, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
            model = LlavaNextForConditionalGeneration(config)
    elif family == "llava_onevision":  # SigLIP tower (no [CLS]), Qwen2 decoder, as the released checkpoints
        from transformers import Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4,
            vision_use_head=False,  # as in the released llava-onevision configs: LLaVA reads the patch states
        )  # fmt: skip
        config = LlavaOnevisionConfig(
            vision_config=vision, text_config=Qwen2Config(**text), image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], vision_aspect_ratio="anyres_max_9",
        )  # fmt: skip
        model = LlavaOnevisionForConditionalGeneration(config)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        special = dict(
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        vision = dict(patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=4, depth=2)
        if family == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
        else:
            vision.update(
                hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64, window_size=8, fullatt_block_indexes=[1]
            )
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
            model = Qwen2_5_VLForConditionalGeneration(config)
    elif family == "qwen3_vl":
        # interleaved M-RoPE, q/k norms, deepstack features from tower blocks 0 and 1 added after LLM layers 0 and 1
        text.update(head_dim=hidden_size // heads, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})  # fmt: skip
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                      patch_size=2, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])  # fmt: skip
        config = Qwen3VLConfig(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        )  # fmt: skip
        model = Qwen3VLForConditionalGeneration(config)
    elif family == "qwen3_5":  # Qwen3-VL's tower (no deepstack); linear-attention and gated full-attention layers
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        text.update(
            head_dim=32, layer_types=["linear_attention", "full_attention"] * (num_layers // 2), linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True, "partial_rotary_factor": 0.25},
        )  # fmt: skip
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                      patch_size=2, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)  # fmt: skip
        config = Qwen3_5Config(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        )  # fmt: skip
        model = Qwen3_5ForConditionalGeneration(config)
    elif family == "gemma3":  # SigLIP pooled 2x2 to 4 x 4 tokens; sliding and full layers, each with its rotary
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            SiglipVisionConfig,
        )

        text.update(
            head_dim=hidden_size // heads, query_pre_attn_scalar=hidden_size // heads, sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2),
        )  # fmt: skip
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4,
            vision_use_head=False,
        )  # fmt: skip
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
            boi_token_index=IMAGE_START, eoi_token_index=IMAGE_END,
        )  # fmt: skip
        model = Gemma3ForConditionalGeneration(config)
        # transformers initialises the projection to zeros (every image would be the same blank features)
        nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    elif family == "mistral3":  # Pixtral tower at native resolution, 2x2 patch merger, Mistral decoder
        from transformers import (
            Mistral3Config,
            Mistral3ForConditionalGeneration,
            MistralConfig,
            PixtralVisionConfig,
        )

        vision = PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=4,
            head_dim=8,
        )  # fmt: skip
        config = Mistral3Config(
            vision_config=vision, text_config=MistralConfig(**text), image_token_index=IMAGE_TOKEN,
            spatial_merge_size=2, vision_feature_layer=-1,
        )  # fmt: skip
        model = Mistral3ForConditionalGeneration(config)
    elif family == "internvl":  # InternViT tiles (with [CLS]), 2x2 pixel shuffle, Qwen2 decoder
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=[32, 32],
            patch_size=[4, 4],
        )  # fmt: skip
        config = InternVLConfig(
            vision_config=vision, text_config=Qwen2Config(**text), image_token_id=IMAGE_TOKEN, image_seq_length=16,
            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        )  # fmt: skip
        model = InternVLForConditionalGeneration(config)
    elif family == "glm4v":  # GLM-4.1V: Qwen2-VL-like grids, conv merge, interleaved M-RoPE over half of each head
        from transformers import Glm4vConfig, Glm4vForConditionalGeneration

        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                     "partial_rotary_factor": 0.5})  # fmt: skip
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                      patch_size=2, spatial_merge_size=2, temporal_patch_size=2, image_size=16)  # fmt: skip
        config = Glm4vConfig(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
            image_start_token_id=VISION_START, image_end_token_id=VISION_END,
        )  # fmt: skip
        model = Glm4vForConditionalGeneration(config)
    elif family == "smolvlm":  # SigLIP crops of 32 px, pixel shuffle 2 (16 tokens a crop), Llama decoder
        from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

        vision = SmolVLMVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4
        )
        config = SmolVLMConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_id=IMAGE_TOKEN, scale_factor=2
        )
        model = SmolVLMForConditionalGeneration(config)
    elif family == "paligemma":  # SigLIP (every patch a token), Gemma decoder behind a prefix-LM mask
        # (PaliGemma 2's Gemma 2 decoder has no SDPA path in transformers: its own test builds it, eager)
        from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

        text["head_dim"] = hidden_size // heads
        if gemma2:
            text.update(
                query_pre_attn_scalar=hidden_size // heads, sliding_window=sliding_window, attn_logit_softcapping=50.0,
                layer_types=["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2),
            )  # fmt: skip
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4,
            vision_use_head=False, projection_dim=hidden_size,
        )  # fmt: skip
        config = PaliGemmaConfig(
            vision_config=vision, text_config=(Gemma2Config if gemma2 else GemmaConfig)(**text), vocab_size=VOCAB,
            image_token_index=IMAGE_TOKEN, projection_dim=hidden_size, hidden_size=hidden_size,
        )  # fmt: skip
        model = PaliGemmaForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def llava_shaped_model(
    *,
    text_hidden: int = 1024,
    text_layers: int = 8,
    vision_hidden: int = 256,
    vision_layers: int = 6,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A random LLaVA-1.5-shaped model big enough to time on a CPU: a 336 px / 14 px CLIP tower (576 image tokens
    from its penultimate layer) and a Llama decoder of ``text_layers`` x ``text_hidden``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 64),
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=int(2.75 * text_hidden),
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_hidden // 128),
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def llava_shaped_batch(model: nn.Module, *, text_before: int = 35, text_after: int = 20, seed: int = 0) -> dict:
    """One LLaVA-1.5-style prompt (35 system tokens, the image's 576 placeholders, a 20-token question)."""
    generator = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tokens = torch.cat(
        [
            torch.randint(3, TEXT_TOKENS, (text_before,), generator=generator),
            torch.full((side * side,), IMAGE_TOKEN),
            torch.randint(3, TEXT_TOKENS, (text_after,), generator=generator),
        ]
    )[None]
    size = model.config.vision_config.image_size
    return {
        "input_ids": tokens,
        "attention_mask": torch.ones_like(tokens),
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
    }


def qwen3_vl_shaped_model(
    *,
    text_hidden: int = 1024,
    text_layers: int = 8,
    vision_hidden: int = 256,
    vision_layers: int = 6,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A random Qwen3-VL-8B-shaped model big enough to time on a CPU: 16 px patches merged 2x2, deepstack features
    from tower blocks at a third, two thirds and the end of its depth (8 / 16 / 24 of 27 on the 8B model) added
    after LLM layers 0-2, interleaved M-RoPE over 128-dim heads, a decoder of ``text_layers`` x ``text_hidden``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    heads = max(1, text_hidden // 128)
    text = dict(
        hidden_size=text_hidden, intermediate_size=3 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128, vocab_size=VOCAB,
        max_position_embeddings=8192, pad_token_id=PAD_TOKEN,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )  # fmt: skip
    deepstack = [vision_layers // 3, 2 * vision_layers // 3, vision_layers - 1]
    vision = dict(
        depth=vision_layers, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
        num_heads=max(1, vision_hidden // 64), out_hidden_size=text_hidden, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=deepstack,
    )  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def qwen3_vl_shaped_batch(
    model: nn.Module, *, size: int = 448, text_before: int = 35, text_after: int = 20, seed: int = 0
) -> dict:
    """One prompt with a ``size`` x ``size`` image (448 px: 28 x 28 patches, 196 merged tokens) between 35 system
    tokens and a 20-token question."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    side = size // vision.patch_size
    tokens = torch.cat(
        [
            torch.randint(3, TEXT_TOKENS, (text_before,), generator=generator),
            torch.tensor([VISION_START]),
            torch.full((side * side // vision.spatial_merge_size**2,), IMAGE_TOKEN),
            torch.tensor([VISION_END]),
            torch.randint(3, TEXT_TOKENS, (text_after,), generator=generator),
        ]
    )[None]
    row = 3 * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": tokens,
        "attention_mask": torch.ones_like(tokens),
        "mm_token_type_ids": (tokens == IMAGE_TOKEN).int(),
        "pixel_values": torch.randn(side * side, row, generator=generator),
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }


@dataclass(frozen=True)
class Image:
    """An image in a test prompt. ``size`` is (height, width) in pixels: LLaVA ignores it (fixed 32 x 32),
    LLaVA-NeXT uses it for its any-resolution views, Qwen for its dynamic grid (multiples of 4 pixels)."""

    size: tuple[int, int] = (32, 32)


@dataclass(frozen=True)
class Video:
    """A video: ``frames`` temporal slices (each two frames deep on Qwen) of ``size`` pixels (LLaVA-OneVision: frames
    of the tower's image size)."""

    frames: int = 2
    size: tuple[int, int] = (16, 16)


def make_batch(
    model: nn.Module,
    samples: list[list[int | Image | Video]],
    *,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs for ``model`` from prompts such as ``[[5, Image(), 7], [3, 4]]`` (ints are runs of random text tokens).

    Returns what the family's processor would: ``input_ids``, ``attention_mask`` and the pixel inputs. Sample i is
    drawn with seed ``seed + i``, so ``make_batch(m, [p], seed=s + i)`` reproduces it alone.
    """
    singles = [_single(model, sample, seed + i) for i, sample in enumerate(samples)]
    return collate(model, singles, padding_side=padding_side)


def collate(model: nn.Module, singles: list[dict[str, Tensor]], *, padding_side: str = "left") -> dict[str, Tensor]:
    """Pad and stack one-sample batches into one batch (as a processor does for several prompts)."""
    family = _family(model)
    length = max(s["input_ids"].shape[1] for s in singles)
    batch: dict[str, Tensor] = {}
    for key, fill in (("input_ids", PAD_TOKEN), ("attention_mask", 0), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
        if key not in singles[0]:
            continue
        rows = []
        for single in singles:
            value = single[key]
            pad = value.new_full((1, length - value.shape[1]), fill)
            rows.append(torch.cat([pad, value] if padding_side == "left" else [value, pad], 1))
        batch[key] = torch.cat(rows)
    if family == "smolvlm":  # [B, crops, C, H, W], padded with all-zero crops (which the model drops)
        crops = [s["pixel_values"] for s in singles if "pixel_values" in s]
        if crops:
            most = max(c.shape[1] for c in crops)
            shape = crops[0].shape[2:]
            batch["pixel_values"] = torch.cat([
                torch.cat([s["pixel_values"], torch.zeros(1, most - s["pixel_values"].shape[1], *shape)], 1)
                if "pixel_values" in s else torch.zeros(1, most, *shape)
                for s in singles
            ])  # fmt: skip
    if family in ANY_RES:
        views = [s["pixel_values"] for s in singles if "pixel_values" in s]
        if views:
            most = max(v.shape[1] for v in views)
            batch["pixel_values"] = torch.cat([torch.cat([v, v.new_zeros(v.shape[0], most - v.shape[1], *v.shape[2:])], 1) for v in views])
    for key in ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in singles if key in s]
        if parts and key not in batch:
            batch[key] = torch.cat(parts)
    return batch


def _single(model: nn.Module, sample: list[int | Image | Video], seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    family = _family(model)
    tokens: list[int] = []
    pixels, sizes, grids, video_pixels, video_grids = [], [], [], [], []
    for part in sample:
        if isinstance(part, int):
            tokens += torch.randint(3, TEXT_TOKENS, (part,), generator=generator).tolist()
        elif isinstance(part, Video) and family == "llava_onevision":  # frames pooled 2x2, one newline at the end
            side = model.config.vision_config.image_size // model.config.vision_config.patch_size
            size = model.config.vision_config.image_size
            video_pixels.append(torch.randn(part.frames, 3, size, size, generator=generator))
            tokens += [VIDEO_TOKEN] * (part.frames * math.ceil(side / 2) ** 2 + 1)
        elif isinstance(part, Video):
            if family not in GRID_FAMILIES:
                raise ValueError(f"{family} takes no video input")
            patches = part.frames * (part.size[0] // 2) * (part.size[1] // 2)
            video_pixels.append(torch.randn(patches, 3 * 2 * 2 * 2, generator=generator))
            video_grids.append([part.frames, part.size[0] // 2, part.size[1] // 2])
            if family in ("qwen3_vl", "qwen3_5", "glm4v"):  # each frame after its timestamp text, as their processors write it
                per_frame = patches // 4 // part.frames
                for _ in range(part.frames):
                    stamp = torch.randint(3, TEXT_TOKENS, (1,), generator=generator).tolist()
                    tokens += stamp + [VISION_START] + [VIDEO_TOKEN] * per_frame + [VISION_END]
            else:
                tokens += [VISION_START] + [VIDEO_TOKEN] * (patches // 4) + [VISION_END]
        else:
            count = _add_image(model, family, part, generator, pixels, sizes, grids)
            marker = [IMAGE_TOKEN] * count
            if family == "smolvlm":
                marker = _smolvlm_marker(part.size[0] // 32, part.size[1] // 32, count // _crops(part.size))
            if family == "mistral3":  # rows of [IMG], each ended by [IMG_BREAK], the last by [IMG_END]
                cols = part.size[1] // 8
                marker = [t for r in range(count // cols) for t in [IMAGE_TOKEN] * cols + [IMAGE_BREAK]]
                marker[-1] = IMAGE_END
            tokens += [VISION_START, *marker, VISION_END] if family.startswith(("qwen", "gemma", "internvl", "glm")) else marker
    input_ids = torch.tensor([tokens], dtype=torch.long)
    single: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family in ("llava", "gemma3", "paligemma") and pixels:
        single["pixel_values"] = torch.stack(pixels)
    if family == "internvl" and pixels:  # every tile of every image, in prompt order
        single["pixel_values"] = torch.cat(pixels)
    if family == "smolvlm" and pixels:  # [1, crops, C, H, W]: every crop of every image, in prompt order
        single["pixel_values"] = torch.cat(pixels)[None]
    if family == "mistral3" and pixels:  # padded to the largest image, with each image's own size
        single["pixel_values"] = torch.stack(pixels)
        single["image_sizes"] = torch.tensor(sizes)
    if family == "gemma3":  # image tokens attend to each other bidirectionally
        single["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    if family == "paligemma":  # the whole prompt is the bidirectional prefix
        single["token_type_ids"] = torch.zeros_like(input_ids)
    elif family in ANY_RES:
        if pixels:
            most = max(p.shape[0] for p in pixels)
            single["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixels])
            single["image_sizes"] = torch.tensor(sizes)
        if video_pixels:
            single["pixel_values_videos"] = torch.stack(video_pixels)
    elif family in GRID_FAMILIES:
        if pixels:
            single["pixel_values"] = torch.cat(pixels)
            single["image_grid_thw"] = torch.tensor(grids)
        if video_pixels:
            single["pixel_values_videos"] = torch.cat(video_pixels)
            single["video_grid_thw"] = torch.tensor(video_grids)
        single["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int()
        if family == "glm4v":  # video frames are written with the image placeholder; only the types tell them apart
            input_ids[input_ids == VIDEO_TOKEN] = IMAGE_TOKEN
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in single.items()}


def _family(model: nn.Module) -> str:
    name = type(model).__name__
    if name.startswith("LlavaNext"):
        return "llava_next"
    if name.startswith("LlavaOnevision"):
        return "llava_onevision"
    if name.startswith("Llava"):
        return "llava"
    if name.startswith("Qwen2_5_VL"):
        return "qwen2_5_vl"
    if name.startswith("Qwen2VL"):
        return "qwen2_vl"
    if name.startswith("Qwen3VL"):
        return "qwen3_vl"
    if name.startswith("Qwen3_5"):
        return "qwen3_5"
    if name.startswith("Gemma3"):
        return "gemma3"
    if name.startswith("Mistral3"):
        return "mistral3"
    if name.startswith("InternVL"):
        return "internvl"
    if name.startswith("Glm4v"):
        return "glm4v"
    if name.startswith("SmolVLM"):
        return "smolvlm"
    if name.startswith("PaliGemma"):
        return "paligemma"
    raise ValueError(f"not a tiny test model: {name}")


def _add_image(
    model: nn.Module,
    family: str,
    image: Image,
    generator: torch.Generator,
    pixels: list[Tensor],
    sizes: list[list[int]],
    grids: list[list[int]],
) -> int:
    """Append one image's pixel inputs; return its number of placeholder tokens."""
    if family in ("llava", "paligemma"):
        pixels.append(torch.randn(3, 32, 32, generator=generator))
        return (32 // 4) ** 2
    if family == "gemma3":
        pixels.append(torch.randn(3, 32, 32, generator=generator))
        return model.config.mm_tokens_per_image
    if family in ("internvl", "smolvlm"):  # 32 px tiles as the processors cut them, then a thumbnail if several
        tiles = _crops(image.size)
        pixels.append(torch.randn(tiles, 3, 32, 32, generator=generator))
        return tiles * (model.config.image_seq_length if family == "internvl" else model.model.image_seq_len)
    if family == "mistral3":  # sizes in multiples of 8 px (patch 4, merge 2), on a canvas of the largest size
        height, width = image.size
        side = model.config.vision_config.image_size
        canvas = torch.zeros(3, side, side)
        canvas[:, :height, :width] = torch.randn(3, height, width, generator=generator)
        pixels.append(canvas)
        sizes.append([height, width])
        return (height // 8) * (width // 8)
    if family in ANY_RES:
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        config = model.config
        views = image_size_to_num_patches(list(image.size), config.image_grid_pinpoints, config.vision_config.image_size)
        view_pixels = torch.randn(views, 3, 32, 32, generator=generator)
        with torch.no_grad():
            features = model.model.get_image_features(view_pixels[None], torch.tensor([image.size])).pooler_output
        pixels.append(view_pixels)
        sizes.append(list(image.size))
        return features[0].shape[0]
    height, width = image.size[0] // 2, image.size[1] // 2
    pixels.append(torch.randn(height * width, 3 * 2 * 2 * 2, generator=generator))
    grids.append([1, height, width])
    return height * width // 4


def _crops(size: tuple[int, int]) -> int:
    """InternVL's tiles and SmolVLM's crops of a ``size`` image at 32 px: rows x cols, then a global one if several."""
    rows, cols = size[0] // 32, size[1] // 32
    return rows * cols + (1 if rows * cols > 1 else 0)


def _smolvlm_marker(rows: int, cols: int, per_crop: int) -> list[int]:
    """SmolVLM's prompt for one image (its processor's ``get_image_prompt_string``, one id per special string)."""
    crop = [IMAGE_TOKEN] * per_crop
    if rows * cols == 1:
        return [FAKE_AROUND_IMAGE, GLOBAL_IMAGE, *crop, FAKE_AROUND_IMAGE]
    tokens = []
    for _ in range(rows):
        for _ in range(cols):
            tokens += [FAKE_AROUND_IMAGE, CROP_TAG, *crop]
        tokens.append(NEWLINE)
    return tokens + [NEWLINE, FAKE_AROUND_IMAGE, GLOBAL_IMAGE, *crop, FAKE_AROUND_IMAGE]


def tiny_processor(family: str, model: nn.Module | None = None) -> Any:
    """A working processor for :func:`tiny_model` (a word-level tokenizer over ``w3 .. w119``, the family's image
    processor at the tiny tower's sizes, a one-turn chat template). Families: llava, qwen2_vl, qwen2_5_vl."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    qwen = family.startswith("qwen")
    if qwen:
        names = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}  # fmt: skip
        for token_id, key in ((IMAGE_TOKEN, "image_token"), (VIDEO_TOKEN, "video_token"),
                              (VISION_START, "vision_start_token"), (VISION_END, "vision_end_token")):  # fmt: skip
            words[token_id] = names[key]
        image_part = "<|vision_start|> <|image_pad|> <|vision_end|> "
        video_part = "{% elif c['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|> "
    elif family == "llava":
        video_part = ""
        names = {"image_token": "<image>"}
        words[IMAGE_TOKEN] = "<image>"
        image_part = "<image> "
    else:
        raise ValueError(f"tiny processors exist for llava, qwen2_vl and qwen2_5_vl, got {family!r}")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>", extra_special_tokens=names
    )
    template = (
        "{% for m in messages %}w4 {% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_part
        + video_part + "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}w5"
    )  # fmt: skip
    if qwen:
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2)
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=16 * 16, max_pixels=64 * 64),
            # frames of at most 32 x 32 pixels: 64 tokens per temporal pair (the defaults make thousands)
            video_processor=Qwen2VLVideoProcessor(**sizes, size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}),
            tokenizer=tokenizer,
            chat_template=template,
        )
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = (model or tiny_model(family)).config.vision_config
    side = vision.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS], as in the llava-hf processors
        chat_template=template,
    )


def save_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny model of ``family`` with its :func:`tiny_processor`, so the ``from_pretrained`` path users take
    with real checkpoints can run here. Families: llava, qwen2_vl, qwen2_5_vl."""
    model = tiny_model(family, seed=seed)
    processor = tiny_processor(family, model)
    target = Path(path)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
