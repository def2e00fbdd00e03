"""GLM-4V adapter: video frames written with the image placeholder are told apart by ``mm_token_type_ids`` and
budgeted one by one; images and videos together fail as GLM itself fails. (Images, in-LLM stages, generate and the
interleaved partial rotary of recomputed attention rows are covered by the cross-family tests.)"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, Video, make_batch, pooled, tiny_model
from vtprune.testing import IMAGE_TOKEN


def test_video_frames_share_the_image_placeholder_and_are_split_by_token_types():
    model = tiny_model("glm4v")
    batch = make_batch(model, [[3, Video(2, (16, 16)), 4]])
    assert not (batch["input_ids"] == model.config.video_token_id).any()  # as GLM's processor writes videos
    adapter = vtprune.adapter_for(model)
    masks = adapter.input_placeholders(batch)
    assert int(masks["video"].sum()) == 32 and not masks["image"].any()
    untyped = adapter.placeholder_masks(batch["input_ids"], None)  # without types every placeholder is an image's
    assert torch.equal(untyped["image"], batch["input_ids"] == IMAGE_TOKEN) and not untyped["video"].any()


@pytest.mark.parametrize("method,unit", [("random", "frame"), ("evs", "video")])
def test_pruned_video_frames_equal_the_model_fed_only_the_kept_tokens(method, unit):
    model = tiny_model("glm4v")
    batch = make_batch(model, [[3, Video(2, (16, 16)), 4], [6, Video(3, (16, 24)), 1]])
    full_positions, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], None, batch["video_grid_thw"], attention_mask=batch["attention_mask"]
    )
    keep = 3 if method == "random" else 0.4
    with vtprune.wrap(model, method, keep=keep, budget_unit=unit) as pruning:
        pruned = model(**batch).logits
        record = pruning.last
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        # generate() drops the grids: they are read back off the positions
        grids = [[(0, 4, 4, 4)]] * 2 + [[(0, 4, 6, 6)]] * 3
        if unit == "video":
            grids = [[(0, 4, 4, 4), (16, 4, 4, 4)], [(0, 4, 6, 6), (24, 4, 6, 6), (48, 4, 6, 6)]]
        assert pruning.last.item_grids == grids
    kept = record.stages[0].kept_per_item
    frames = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
    if unit == "frame":
        assert [i["num_tokens"] for i in record.items] == [16, 16, 24, 24, 24]  # one item per frame
        assert [k.numel() for k in kept] == [3] * 5
        per_frame = [f for video, t in zip(frames, batch["video_grid_thw"][:, 0].tolist()) for f in video.chunk(t)]
        kept_rows = [torch.cat([per_frame[i][kept[i]] for i in items]) for items in ([0, 1], [2, 3, 4])]
    else:
        assert [i["num_tokens"] for i in record.items] == [32, 72]  # one item per video
        assert [k.numel() for k in kept] == [16, 28]  # EVS: max(N, int(T * N * 0.4))
        kept_rows = [video[k] for video, k in zip(frames, kept)]
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)
    index = record.output_index
    valid = index >= 0
    short = {
        "input_ids": batch["input_ids"].gather(1, index.clamp(min=0)).masked_fill(~valid, 0),
        "attention_mask": valid.long(),
        "mm_token_type_ids": batch["mm_token_type_ids"].gather(1, index.clamp(min=0)).masked_fill(~valid, 0),
        "position_ids": full_positions.gather(-1, index.clamp(min=0)[None].expand(3, -1, -1)),
        "mm_encoder_outputs": {"video": pooled(kept_rows)},
    }
    expected = model(**short).logits
    assert_close(pruned[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_images_and_videos_in_one_call_fail_as_glm_itself_fails():
    model = tiny_model("glm4v")
    images = make_batch(model, [[3, Image((16, 16)), 2]])
    video = make_batch(model, [[3, Video(2, (16, 16)), 4]], seed=1)
    both = {
        "input_ids": torch.cat([images["input_ids"], video["input_ids"]], 1),
        "attention_mask": torch.cat([images["attention_mask"], video["attention_mask"]], 1),
        "mm_token_type_ids": torch.cat([images["mm_token_type_ids"], video["mm_token_type_ids"]], 1),
        **{k: images[k] for k in ("pixel_values", "image_grid_thw")},
        **{k: video[k] for k in ("pixel_values_videos", "video_grid_thw")},
    }
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**both)
    with vtprune.wrap(model, "random", keep=3), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**both)
