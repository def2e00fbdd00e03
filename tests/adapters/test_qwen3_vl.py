"""Qwen3-VL adapter: deepstack features follow the kept tokens, and a video's frames (each after its timestamp text)
are budgeted one by one."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import Image, Video, make_batch, tiny_model


def test_pre_llm_pruning_hands_the_model_the_kept_rows_of_every_deepstack_layer():
    model = tiny_model("qwen3_vl")
    batch = make_batch(model, [[3, Image((16, 24)), 2, Image((16, 16)), 4]])
    seen = {}

    def note(module, args, kwargs):
        seen["deepstack"] = kwargs.get("deepstack_visual_embeds")
        seen["mask"] = kwargs.get("visual_pos_masks")

    handle = model.model.language_model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        with vtprune.wrap(model, "random", keep=5) as pruning:
            model(**batch)
    finally:
        handle.remove()
    kept = pruning.last.stages[0].kept_per_item
    full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert len(seen["deepstack"]) == len(model.config.vision_config.deepstack_visual_indexes) == 2
    assert int(seen["mask"].sum()) == 10
    for layer, rows in enumerate(seen["deepstack"]):
        expected = torch.cat([image[k] for image, k in zip(full.deepstack_features[layer], kept)])
        torch.testing.assert_close(rows, expected)


def test_video_frames_after_timestamps_are_items_also_inside_generate():
    model = tiny_model("qwen3_vl")
    batch = make_batch(model, [[3, Video(3, (16, 16)), 4]])
    with vtprune.wrap(model, "uniform", keep=2) as pruning:  # the default: one item per video
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert pruning.last.items == [{"sample": 0, "modality": "video", "num_tokens": 48, "frames": [16, 16, 16]}]
    assert pruning.last.item_grids == [[(0, 4, 4, 4), (16, 4, 4, 4), (32, 4, 4, 4)]]
    with vtprune.wrap(model, "uniform", keep=2, budget_unit="frame") as pruning:
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    items = pruning.last.items
    assert [i["modality"] for i in items] == ["video"] * 3 and [i["num_tokens"] for i in items] == [16] * 3
    assert pruning.last.item_grids == [[(0, 4, 4, 4)]] * 3  # read back off the positions when grids are dropped
    assert [k.numel() for k in pruning.last.stages[0].kept_per_item] == [2, 2, 2]
