"""Downsample: equal to the model fed the smaller image; refused on CLIP towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, tiny_model
from vtprune.core.budget import pooled_shape


def _small_image_prompt(model, batch, new_rows, new_cols):
    """The single-image prompt the processor would make from the image resized to ``new_rows x new_cols`` tokens:
    patches -> image (plain reshapes) -> bicubic resize -> the processor's own patchify."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        Qwen2VLImageProcessor,
    )

    from vtprune.testing import IMAGE_TOKEN

    _, height, width = batch["image_grid_thw"][0].tolist()
    rows = batch["pixel_values"]
    image = torch.zeros(3, height * 2, width * 2)
    index = 0
    for block_r in range(height // 2):  # the processor's order: 2x2 merge blocks in raster order, patches within
        for block_c in range(width // 2):
            for r in range(2):
                for c in range(2):
                    patch = rows[index].view(3, 2, 2, 2)[:, 0]  # channels, temporal copy 0, 2x2 pixels
                    top, left = (block_r * 2 + r) * 2, (block_c * 2 + c) * 2
                    image[:, top : top + 2, left : left + 2] = patch
                    index += 1
    size = (new_rows * 4, new_cols * 4)
    small = F.interpolate(image[None], size=size, mode="bicubic", antialias=True)
    pixels, grid_h, grid_w = Qwen2VLImageProcessor().patchify(small, patch_size=2, merge_size=2, temporal_patch_size=2)
    ids = batch["input_ids"][0]
    image_positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    new_ids = torch.cat([ids[: image_positions[0]], torch.full((new_rows * new_cols,), IMAGE_TOKEN), ids[image_positions[-1] + 1 :]])
    return {
        "input_ids": new_ids[None],
        "attention_mask": torch.ones(1, new_ids.numel(), dtype=torch.long),
        "pixel_values": pixels[0],
        "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
        "mm_token_type_ids": (new_ids == IMAGE_TOKEN).int()[None],
    }


def test_downsample_equals_the_model_fed_the_smaller_image():
    from vtprune.testing import Image

    for family in ("qwen2_vl", "qwen2_5_vl"):
        model = tiny_model(family)
        batch = make_batch(model, [[3, Image((32, 48)), 5]])  # 8 x 12 merged tokens
        with vtprune.wrap(model, "downsample", keep=24) as pruning:
            pruned = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=list(range(120, 128)))
        rows, cols = pooled_shape(8, 12, 24)
        assert (rows, cols) == (4, 6)
        small = _small_image_prompt(model, batch, rows, cols)
        expected = model(**small).logits
        assert pruned.shape == expected.shape
        assert_close(pruned, expected, rtol=1e-4, atol=1e-4)
        expected_generation = model.generate(**small, max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=list(range(120, 128)))
        assert torch.equal(generated[:, -4:], expected_generation[:, -4:])


def test_downsample_refuses_clip_towers():
    import pytest

    with pytest.raises(ValueError, match=r"applies to the dynamic-resolution M-RoPE families .* use 'pool'"):
        vtprune.wrap(tiny_model("llava"), "downsample", keep=16)
