"""Shared builders for the tests: tiny models of every family and batches with varied images and padding."""

from __future__ import annotations

import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from vtprune.api import adapter_for, checked_stages, model_info
from vtprune.core.registry import make_method
from vtprune.testing import (
    FAMILIES,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    Image,
    Video,
    collate,
    make_batch,
    tiny_model,
)

__all__ = [
    "CONFIGS",
    "assert_batch_equals_each_sample_alone",
    "IDS",
    "inapplicable",
    "FAMILIES",
    "Image",
    "Video",
    "collate",
    "make_batch",
    "tiny_model",
    "samples_for",
    "singles_for",
    "with_positions",
    "rows_of",
    "visual_counts",
    "visual_mask",
    "newline_tokens",
    "pooled",
    "view_count",
    "is_mrope",
    "extend_prompt",
    "generate_matches_frozen_recomputation",
    "NO_SPECIAL",
    "mrope_born_short_logits",
]


# (method, options): every LLM-side method at each pruning point it supports, and both position conventions. Every
# cross-cutting test iterates this one list; tests/core/test_registry.py checks it covers every LLM-side method.
CONFIGS = [
    ("random", {}),
    ("random", {"layer": 2}),
    ("uniform", {}),
    ("uniform", {"layer": 1}),
    ("fastv", {}),
    ("random", {"positions": "keep"}),
    ("fastv", {"layer": 1, "positions": "renumber"}),
    ("vtc_cls", {}),
    ("fastervlm", {}),
    ("entropyprune", {}),
    ("transprune", {}),
    ("transprune", {"ttv_only": True}),
    ("mmtok", {}),
    ("pool", {}),
    ("pool", {"where": "before"}),
    ("pool", {"layer": 2}),
    ("divprune", {}),
    ("pdrop", {}),
    ("fastv", {"query": "all"}),
    ("visionzip", {}),
    ("sparsevlm", {}),
    ("sparsevlm", {"recycle": False}),
    ("downsample", {}),
    ("dart", {}),
    ("dart", {"layer": 3, "pivot_text": 0, "positions": "renumber"}),
    ("vispruner", {}),
    ("hiprune", {}),
    ("hiprune", {"buffer": "grid", "alpha": 0.5}),
    ("visiondrop", {}),
    ("vflowopt", {}),
    ("vflowopt", {"cell": 3.0, "ratios": (0.8, 0.5), "positions": "keep"}),
    ("todre", {}),
    ("todre", {"variant": "kcenter", "query": "instruction", "positions": "keep"}),
    ("todre", {"drop_all": True}),
    ("catp", {}),
    ("catp", {"query": "last", "alpha": 0.0, "positions": "keep"}),
    ("infohorizon", {}),
    ("infohorizon", {"layer": 3, "early_scale": 4, "seed": 1, "positions": "renumber"}),
    ("zoo_prune", {}),
    ("zoo_prune", {"directions": 8, "eps": 0.05, "seed": 3, "positions": "keep"}),
    ("mustdrop", {}),
    ("mustdrop", {"decode_every": 1, "positions": "keep"}),
    ("adaptinfer", {}),
    ("adaptinfer", {"layers": (1,), "ratio": 2.0, "positions": "keep"}),
    ("evs", {}),
    ("dycoke", {}),
    ("dycoke", {"k": 0.7, "stable": "dense", "threshold": 1.0, "positions": "keep"}),
    ("fastvid", {}),
    ("fastvid", {"c": 2, "ignore": None, "d": 0.0}),
    ("holitom", {}),
    ("holitom", {"inner_ratio": 0.0, "contextual": 0.5, "positions": "keep"}),
    ("prunevid", {}),
    ("prunevid", {"tau": 0.9, "temporal_segment_ratio": 0.5, "positions": "keep"}),
    # DyVTE's static exit: every visual token of every sample leaves at layer 2 (the gates are model-specific)
    ("dyvte", {"layer": 2}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CONFIGS]


@functools.cache
def _info(family: str):
    return model_info(adapter_for(tiny_model(family)))


def inapplicable(family: str, method: str, options: dict) -> str | None:
    """Why ``method`` refuses ``family`` (its own clear ValueError from ``stages()``: no [CLS] token, no
    dynamic-resolution tower, no per-token projector, ...), or None when it applies."""
    if family == "llava_onevision" and method == "pool" and options.get("where") == "before":
        return "pool: where='before' refuses videos, which LLaVA-OneVision pools after its projector"  # its own test
    try:
        config = make_method(method, **options)
        checked_stages(config, config.stages(_info(family), 4), _info(family))
    except ValueError as error:
        return str(error).split(";")[0]
    return None


def samples_for(family: str) -> list[list]:
    """Prompts of different lengths, image counts and image sizes; the last sample has no image."""
    if family in ("llava", "gemma3", "paligemma"):
        return [[4, Image(), 6], [2, Image(), 3, Image(), 5], [9]]
    if family == "llava_next":
        return [[4, Image((32, 48)), 6], [2, Image((48, 32)), 3, Image((64, 64)), 2], [9]]
    if family in ("internvl", "smolvlm"):  # tiles (crops): 1, 2 + thumbnail (global crop), 4 + thumbnail
        return [[4, Image((32, 32)), 6], [2, Image((32, 64)), 3, Image((64, 64)), 5], [9]]
    if family == "mistral3":  # native resolution: each image its own grid
        return [[4, Image((32, 24)), 6], [2, Image((16, 32)), 3, Image((32, 32)), 5], [9]]
    if family == "llava_onevision":
        return [[4, Image((32, 48)), 6], [2, Image((48, 32)), 3, Video(2), 2], [9]]
    if family == "glm4v":  # GLM's forward takes no images and videos together (videos: tests/adapters/test_glm4v.py)
        return [[4, Image((16, 16)), 6], [2, Image((24, 16)), 3, Image((16, 16)), 2], [9]]
    return [[4, Image((16, 16)), 6], [2, Image((24, 16)), 3, Video(2, (16, 16)), 2], [9]]


def singles_for(model, family: str) -> list[dict]:
    """Each prompt of :func:`samples_for` as its own one-sample batch."""
    return [make_batch(model, [prompt], seed=i) for i, prompt in enumerate(samples_for(family))]


def is_mrope(model) -> bool:
    """Qwen-like families: patch grids and 3-D M-RoPE positions (Qwen2-VL to Qwen3.5, GLM-4V)."""
    return type(model).__name__.startswith(("Qwen", "Glm4v"))


def with_positions(model, batch: dict) -> dict:
    """The batch with the position ids generate() would use (padding-aware), for 1-D RoPE families."""
    if is_mrope(model):
        return batch
    mask = batch["attention_mask"]
    return {**batch, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}


def extend_prompt(batch: dict, ids: torch.Tensor, model=None) -> dict:
    """The batch with its prompt extended by generated tokens (PaliGemma's causal suffix: token type 1)."""
    extra = ids.shape[1] - batch["input_ids"].shape[1]
    full = {**batch, "input_ids": ids}
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], extra, dtype=torch.long)], 1)
    suffix = int(type(model).__name__.startswith("PaliGemma"))
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in batch:
            fill = torch.full((ids.shape[0], extra), suffix if key == "token_type_ids" else 0, dtype=batch[key].dtype)
            full[key] = torch.cat([batch[key], fill], 1)
    return full


NO_SPECIAL = {"suppress_tokens": list(range(120, 128)), "pad_token_id": 0}  # tiny vocabularies' special ids


def generate_matches_frozen_recomputation(model, batch: dict, pruning, steps: int = 4):
    """Greedy-generate ``steps`` tokens with the wrapped ``model``, then check every step's logits against a forward
    without cache that replays the prefill's selection (``pruning.freeze()``) on the prompt extended by the tokens
    generated so far; returns generate's output."""
    from torch.testing import assert_close

    generated = model.generate(
        **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **NO_SPECIAL,
    )  # fmt: skip
    prompt = batch["input_ids"].shape[1]
    with pruning.freeze():
        for step in range(steps):
            full = extend_prompt(batch, generated.sequences[:, : prompt + step], model)
            logits = model(**with_positions(model, full), use_cache=False).logits
            assert_close(logits[:, -1], generated.logits[step], rtol=1e-4, atol=1e-4)
    return generated


def mrope_born_short_logits(model, batch: dict, index: torch.Tensor, encoder_outputs: dict) -> torch.Tensor:
    """The unwrapped M-RoPE model fed only the prompt slots ``index [B, L]`` (-1: padding) with ``encoder_outputs``
    for their visual tokens and the full prompt's 3-D position ids sliced (gaps kept, text after the video too)."""
    valid = index >= 0
    full_positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return model(
        input_ids=batch["input_ids"].gather(1, index.clamp(min=0)).masked_fill(~valid, 0),
        attention_mask=valid.long(),
        position_ids=full_positions.gather(-1, index.clamp(min=0).expand(3, -1, -1)),
        mm_encoder_outputs=encoder_outputs,
    ).logits


def rows_of(logits: torch.Tensor, index: torch.Tensor, sample: int) -> torch.Tensor:
    """The logits rows of one sample's real tokens, in prompt order; ``index[b, j]`` = prompt position or -1."""
    row = index[sample]
    order = row[row >= 0].argsort()
    return logits[sample][row >= 0][order]


def visual_mask(batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    return (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)


def visual_counts(batch: dict) -> list[int]:
    return visual_mask(batch).sum(1).tolist()


def newline_tokens(model, image: Image) -> int:
    """LLaVA-NeXT's newline tokens for an image of this size, from transformers' own any-res arithmetic."""
    if not type(model).__name__.startswith(("LlavaNext", "LlavaOnevision")):
        return 0
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(list(image.size), config.image_grid_pinpoints, config.vision_config.image_size)
    # one newline per row of the unpadded high-resolution grid
    return unpad_image(torch.empty(0, rows * side, cols * side), torch.tensor(image.size)).shape[1]


def view_count(model, image: Image) -> int:
    """Views (base + crops, or tiles) the vision tower sees for one image: several on LLaVA-NeXT, InternVL and
    SmolVLM, one elsewhere."""
    if type(model).__name__.startswith(("InternVL", "SmolVLM")):
        tiles = (image.size[0] // 32) * (image.size[1] // 32)
        return tiles + (1 if tiles > 1 else 0)
    if not type(model).__name__.startswith(("LlavaNext", "LlavaOnevision")):
        return 1
    from transformers.models.llava_next.modeling_llava_next import (
        image_size_to_num_patches,
    )

    config = model.config
    return image_size_to_num_patches(list(image.size), config.image_grid_pinpoints, config.vision_config.image_size)


def pooled(rows: list[torch.Tensor]) -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(pooler_output=list(rows))


def assert_batch_equals_each_sample_alone(model, family: str, method, keep, padding_side: str = "left", **options):
    """A padded batch of ``singles_for(model, family)`` wrapped with ``method`` gives each sample's logits rows and
    kept tokens exactly as the sample alone does (the last sample has no image)."""
    from torch.testing import assert_close

    import vtprune

    singles = singles_for(model, family)
    batch = with_positions(model, collate(model, singles, padding_side=padding_side))
    with vtprune.wrap(model, method, keep=keep, **options) as pruning:
        batched = model(**batch).logits
        batched_index = pruning.last.output_index
        batched_kept = [[k.clone() for k in stage] for stage in pruning.kept]
        for sample, single in enumerate(singles):
            alone = model(**with_positions(model, single)).logits
            has_image = sample < 2
            alone_index = pruning.last.output_index if has_image else torch.arange(alone.shape[1])[None]
            assert_close(rows_of(batched, batched_index, sample), rows_of(alone, alone_index, 0), rtol=1e-4, atol=1e-4)
            if has_image:
                for stage, kept in enumerate(pruning.kept):
                    assert torch.equal(kept[0], batched_kept[stage][sample])
