"""Qwen2-VL / Qwen2.5-VL adapter: one budgeted item per image and per video (its temporal slices as frames), or per
temporal slice with ``budget_unit="frame"``."""

from __future__ import annotations

import vtprune
from tests.helpers import Image, Video, make_batch, tiny_model


def test_budget_applies_per_image_and_per_video_frame():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Image((16, 24)), 2, Video(3, (16, 16)), 4]])
    with vtprune.wrap(model, "uniform", keep=2) as pruning:  # the default: one budget per video
        model(**batch)
    items = pruning.last.items
    assert [i["modality"] for i in items] == ["image", "video"] and items[1]["frames"] == [16, 16, 16]
    assert [k.numel() for k in pruning.last.stages[0].kept_per_item] == [2, 2]
    assert pruning.last.item_grids[1] == [(0, 4, 4, 4), (16, 4, 4, 4), (32, 4, 4, 4)]  # one grid per frame
    with vtprune.wrap(model, "uniform", keep=2, budget_unit="frame") as pruning:
        model(**batch)
    items = pruning.last.items
    assert [i["modality"] for i in items] == ["image", "video", "video", "video"]
    assert [i["num_tokens"] for i in items] == [24, 16, 16, 16]  # 16x24 px -> 8x12 patches -> 4x6 merged
    assert [k.numel() for k in pruning.last.stages[0].kept_per_item] == [2, 2, 2, 2]
    assert pruning.kept[0][0].numel() == 8
