"""EVS (vLLM's Efficient Video Sampling): hand-made frames, vLLM's count, a plain reference of vLLM's
``compute_retention_mask`` on tiny Qwen2.5-VL videos, and the engine's equivalences on videos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, Video, generate_matches_frozen_recomputation, make_batch, tiny_model
from tests.methods.common import batch_equals_each_alone, video_keep_all
from vtprune.core.layout import VisualItem
from vtprune.core.registry import make_method
from vtprune.methods.evs import EVS, item_count, retained_count, retention_order


def vllm_retention_mask(embeds: torch.Tensor, thw: tuple[int, int, int], merge: int, q: float) -> torch.Tensor:
    """vLLM's ``compute_retention_mask`` + ``compute_retained_tokens_count`` (vllm/multimodal/evs.py @ 094f1178),
    written out as the reference does it (in float32 here)."""
    t, h, w = thw
    embeds = embeds.float().reshape(t, h // merge, w // merge, embeds.size(-1))
    per_frame = (h // merge) * (w // merge)
    similarity = F.cosine_similarity(embeds[1:], embeds[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(embeds[:1, :, :, 0]), 1 - similarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    count = max(per_frame, int(per_frame * t * (1 - q)))
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def test_static_patch_dropped_changing_patch_kept_first_frame_whole():
    basis = torch.eye(8)  # one-hot features: a static patch's cosine is exactly 1, a changed one's exactly 0
    frames = basis[:4][None].repeat(3, 1, 1)  # 3 frames of 4 patches, all static ...
    frames[1:, 2] = basis[6]  # ... but patch 2 changes in frame 1 (and stays so in frame 2)
    frames[2, 0] = 3 * basis[7]  # ... and patch 0 in frame 2 (patch 2 stays as in frame 1)
    order = retention_order(frames)
    assert order[:4].tolist() == [0, 1, 2, 3]  # frame 0 first, in raster order
    assert sorted(order[4:6].tolist()) == [4 + 2, 8 + 0]  # the two changed patches next
    assert order[6:].tolist() == [4, 5, 7, 9, 10, 11]  # then the static ones, ties in flat order (stable)
    count = retained_count(0.5, frames=3, per_frame=4)
    assert count == 6
    assert sorted(order[:count].tolist()) == [0, 1, 2, 3, 6, 8]


def test_retained_count_is_vllms():
    assert retained_count(0.3, frames=10, per_frame=100) == 300  # int(T * N * (1 - q))
    assert retained_count(0.3, frames=2, per_frame=100) == 100  # small T: only frame 0 survives (int(60) < 100)
    assert retained_count(0.25, frames=3, per_frame=7) == 7  # int(5.25) -> the frame-0 floor
    assert retained_count(0.55, frames=4, per_frame=9) == 19  # int(19.8): floored, not rounded
    assert retained_count(1.0, frames=4, per_frame=9) == 36
    assert retained_count(50, frames=4, per_frame=9) == 36  # an int keep: capped at the video ...
    assert retained_count(5, frames=4, per_frame=9) == 9  # ... and raised to one whole frame
    video = VisualItem(0, 0, "video", 30, 0, frames=(10, 10, 10))
    image = VisualItem(1, 0, "image", 30, 0)
    assert item_count(0.5, video) == 15 and item_count(0.5, image) == 30


def _clip(model, moving: int | None = None, frames: int = 3, size=(16, 24)) -> dict:
    """A Qwen video whose frames repeat frame 0's pixels (static), optionally with merged patch ``moving`` of the
    last frame redrawn."""
    batch = make_batch(model, [[3, Video(frames, size), 4]])
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // frames
    pixels = pixels[:per_frame].repeat(frames, 1)
    if moving is not None:  # a merged token is 4 consecutive rows (its 2x2 patches)
        start = (frames - 1) * per_frame + 4 * moving
        pixels[start : start + 4] = torch.randn(4, pixels.shape[1], generator=torch.Generator().manual_seed(5))
    return {**batch, "pixel_values_videos": pixels}


def test_static_clip_keeps_frame_zero_plus_the_remainder_and_a_moving_patch():
    model = tiny_model("qwen2_vl")
    static = _clip(model)
    with vtprune.wrap(model, "evs", keep=0.4) as pruning:
        model(**static)
    [kept] = pruning.last.stages[0].kept_per_item
    assert pruning.last.items[0]["frames"] == [24, 24, 24]
    assert kept.numel() == int(72 * 0.4) == 28
    assert kept[:24].tolist() == list(range(24))  # frame 0 whole
    # identical frames: every later patch ties (up to rounding), so the remainder is 4 of frames 1-2
    assert bool((kept[24:] >= 24).all())

    moving = _clip(model, moving=13)
    with vtprune.wrap(model, "evs", keep=25 / 72 + 1e-6) as pruning:  # one token besides frame 0
        model(**moving)
    [kept] = pruning.last.stages[0].kept_per_item
    assert kept.tolist() == [*range(24), 48 + 13]  # the redrawn patch of the last frame


@pytest.mark.parametrize("q", [0.0, 0.5, 0.75, 0.9])
def test_selects_what_vllms_rule_selects_on_qwen2_5_vl_videos(q):
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(4, (16, 24)), 3, Video(3, (24, 16)), 2]])
    with vtprune.wrap(model, "evs", keep=1 - q) as pruning:
        model(**batch)
    record = pruning.last
    videos = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
    merge = model.config.vision_config.spatial_merge_size
    kept = record.stages[0].kept_per_item
    assert kept[0].numel() == 16  # the image passes through
    for embeds, thw, ours in zip(videos, batch["video_grid_thw"].tolist(), kept[1:], strict=True):
        mask = vllm_retention_mask(embeds, tuple(thw), merge, q)
        assert ours.tolist() == mask.nonzero().flatten().tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_keep_all_equals_dense(family):
    _, _, record = video_keep_all(family, "evs")
    assert record.stages[0].kept_per_item[1].numel() == record.items[1]["num_tokens"]


def test_llava_onevision_keeps_the_final_newline_and_vllms_count():
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Video(3), 4]])
    with vtprune.wrap(model, "evs", keep=0.3) as pruning:
        model(**batch)
    item, kept = pruning.last.items[0], pruning.last.stages[0].kept_per_item[0]
    per_frame = item["frames"][0]
    assert item["frames"] == [per_frame, per_frame, per_frame + 1]  # the newline ends the last frame
    assert kept.numel() == max(per_frame, int(3 * per_frame * 0.3)) + 1
    assert kept[:per_frame].tolist() == list(range(per_frame)) and int(kept[-1]) == item["num_tokens"] - 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_clip_alone(padding_side):
    prompts = [[3, Video(2, (16, 24)), 4], [2, Image((16, 16)), 5, Video(4, (16, 16)), 2]]
    batch_equals_each_alone("qwen2_vl", "evs", prompts, padding_side, keep=0.4)


def test_cached_generate_equals_recomputation():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(3, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    steps = 4
    with vtprune.wrap(model, "evs", keep=0.3) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps)
        videos = [i for i, item in enumerate(pruning.last.items) if item["modality"] == "video"]
        assert [pruning.last.stages[0].kept_per_item[i].numel() for i in videos] == [
            max(24, int(72 * 0.3)),
            max(16, int(32 * 0.3)),
        ]


def test_clear_errors_and_config():
    with pytest.raises(ValueError, match="evs prunes videos .* LLaVA-1.5 takes no video input|takes no video input"):
        vtprune.wrap(tiny_model("llava"), "evs", keep=0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "evs", keep=0.5, budget_unit="frame")
    with vtprune.wrap(model, "evs", keep=0.25) as pruning:
        config = pruning.config()
    assert config == {
        "method": "evs", "positions": "keep", "keep": 0.25, "budget": "final", "budget_unit": "video",
        "family": "qwen_vl",
    }  # fmt: skip
    assert vtprune.Method.from_dict({"method": "evs", "positions": "keep"}) == EVS()
    assert make_method("evs") == EVS()
    with pytest.raises(ValueError, match="positions must be one of"):
        EVS(positions="sideways")


def test_images_only_pass_through():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Image((24, 16)), 4]])
    dense = model(**batch).logits
    with vtprune.wrap(model, "evs", keep=0.1):
        assert_close(model(**batch).logits, dense, rtol=1e-5, atol=1e-5)


def test_composed_evs_counts_its_own_part_budget():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(3, (16, 24)), 4]])
    with vtprune.wrap(model, "evs+fastv", keep=(0.5, 0.25)) as pruning:
        model(**batch)
    evs, fastv = pruning.last.stages
    assert [k.numel() for k in evs.kept_per_item] == [16, int(72 * 0.5)]  # image whole, vLLM's count at 0.5
    assert [k.numel() for k in fastv.kept_per_item] == [4, 18]  # then FastV: a quarter of each item
    with pytest.raises(ValueError, match="evs accepts budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "evs+fastv", keep=(0.5, 0.25), budget_unit="frame")
