"""Video budgets (``budget_unit``): ``keep`` counts a whole video's tokens (the default) or each frame's; images are
unaffected; positions after dropping video tokens are the model's own (the unwrapped model fed only the kept
tokens); the unit is recorded in ``config()``."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.evs  # noqa: F401  (registers "evs" before vtprune.methods lists it)
from tests.helpers import Image, Video, make_batch, mrope_born_short_logits, pooled, tiny_model
from vtprune.core.adapter import ItemSpec, VisualChunk
from vtprune.core.engine.prefill import join_frames
from vtprune.core.layout import GridPart


def _kept_counts(pruning) -> list[tuple[str, int, int]]:
    record = pruning.last
    return [
        (item["modality"], item["num_tokens"], kept.numel())
        for item, kept in zip(record.items, record.stages[0].kept_per_item, strict=True)
    ]


@pytest.mark.parametrize("keep", [4, 0.25])
def test_keep_counts_a_whole_video_by_default_and_each_frame_with_budget_unit_frame(keep):
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Image((16, 24)), 2, Video(3, (16, 24)), 4]])  # 24 tokens per image and frame
    with vtprune.wrap(model, "random", keep=keep) as pruning:
        model(**batch)
    video = _kept_counts(pruning)
    assert pruning.last.items[1]["frames"] == [24, 24, 24]
    with vtprune.wrap(model, "random", keep=keep, budget_unit="frame") as pruning:
        model(**batch)
    frame = _kept_counts(pruning)
    per_image = 4 if keep == 4 else 6  # round(0.25 * 24)
    per_video = 4 if keep == 4 else 18  # round(0.25 * 72)
    assert video == [("image", 24, per_image), ("video", 72, per_video)]
    assert frame == [("image", 24, per_image)] + [("video", 24, per_image)] * 3  # today's behaviour
    assert "frames" not in pruning.last.items[1]


def test_budget_unit_in_config_and_round_trip():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(2, (16, 16)), 4]])
    with vtprune.wrap(model, "random", keep=3, budget_unit="frame") as pruning:
        model(**batch)
        config = pruning.config()
    assert config["budget_unit"] == "frame" and config["budget"] == "final" and config["keep"] == 3
    wrap_keys = ("keep", "budget", "budget_unit", "family")
    method = vtprune.Method.from_dict({k: v for k, v in config.items() if k not in wrap_keys})
    options = {"keep": config["keep"], "budget": config["budget"], "budget_unit": config["budget_unit"]}
    with vtprune.wrap(model, method, **options) as again:
        model(**batch)
        assert again.config() == config
    assert [k.tolist() for k in again.last.stages[0].kept_per_item] == [
        k.tolist() for k in pruning.last.stages[0].kept_per_item
    ]
    with vtprune.wrap(model, "random", keep=3) as default:
        assert default.config()["budget_unit"] == "video"


def test_unknown_budget_unit_and_vit_budget_unit_are_clear_errors():
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=r"budget_unit must be one of \('video', 'frame'\)"):
        vtprune.wrap(model, "random", keep=3, budget_unit="clip")
    with pytest.raises(ValueError, match="evs accepts budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "evs", keep=0.5, budget_unit="frame")
    assert getattr(model, "_vtprune_pruning", None) is None  # nothing left installed


def test_modalities_say_which_items_a_pruning_reduces():
    # what the demo reads to leave video methods out of an image benchmark: a video method leaves images whole
    qwen = tiny_model("qwen2_vl")
    batch = make_batch(qwen, [[3, Image((16, 24)), 2, Video(3, (16, 24)), 4]])
    with vtprune.wrap(qwen, "evs", keep=0.25) as pruning:
        assert pruning.modalities == ("video",)
        qwen(**batch)
        assert [kept.numel() for kept in pruning.last.stages[0].kept_per_item][0] == 24  # the image: every token
    with vtprune.wrap(qwen, "random", keep=0.25) as pruning:
        assert pruning.modalities == ("image", "video")
    with vtprune.wrap(tiny_model("llava"), "random", keep=4) as pruning:
        assert pruning.modalities == ("image",)  # LLaVA-1.5 takes no video


def test_images_are_unaffected_by_the_unit():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Image((16, 24)), 2, Image((24, 16)), 4]])
    kept = {}
    for unit in ("video", "frame"):
        with vtprune.wrap(model, "random", keep=5, budget_unit=unit) as pruning:
            logits = model(**batch).logits
        kept[unit] = ([k.tolist() for k in pruning.last.stages[0].kept_per_item], logits)
    assert kept["video"][0] == kept["frame"][0]
    assert_close(kept["video"][1], kept["frame"][1], rtol=0, atol=0)


def test_join_frames_carries_grids_and_structural_tokens():
    part = (GridPart(0, 2, 3, 3),)
    newline = torch.zeros(7, dtype=torch.bool)
    newline[-1] = True
    specs = [ItemSpec(0, 6, part), ItemSpec(6, 6, part), ItemSpec(12, 7, part, newline)]  # LLaVA-OneVision-like
    video = join_frames(VisualChunk("video", torch.zeros(19, 4), specs))
    [spec] = video.items
    assert (spec.start, spec.count, spec.frames) == (0, 19, (6, 6, 7))
    assert [g.offset for g in spec.grids] == [0, 6, 12]
    assert spec.structural.nonzero().flatten().tolist() == [18]
    image = VisualChunk("image", torch.zeros(6, 4), [ItemSpec(0, 6, part)])
    assert join_frames(image) is image
    one_frame = VisualChunk("video", torch.zeros(6, 4), [ItemSpec(0, 6, part)])
    assert join_frames(one_frame) is one_frame


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method,keep", [("evs", 0.3), ("random", 7)])
def test_video_pruning_equals_born_short_prompt(family, method, keep):
    """Dropping video tokens before the LLM (one budget over the video; EVS empties later frames) = the unwrapped
    model fed only the kept tokens with the full prompt's M-RoPE ids sliced (text after the video included; on
    Qwen3-VL each frame's timestamp text and markers stay, even around a frame left empty)."""
    model = tiny_model(family)
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(3, (16, 24)), 5], [4, Video(2, (24, 16)), 3]])
    with vtprune.wrap(model, method, keep=keep) as pruning:
        pruned = model(**batch).logits
    record = pruning.last
    index = record.output_index
    valid = index >= 0
    vlm = model.model
    image_out = vlm.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    video_out = vlm.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    kept = record.stages[0].kept_per_item
    modalities = [item["modality"] for item in record.items]
    assert modalities == ["image", "video", "video"]  # one item per video

    def kept_rows(images: list, videos: list) -> tuple[list, list]:
        return [images[0][kept[0]]], [videos[0][kept[1]], videos[1][kept[2]]]

    image, video = kept_rows(list(image_out.pooler_output), list(video_out.pooler_output))
    encoder_outputs = {"image": pooled(image), "video": pooled(video)}
    if getattr(image_out, "deepstack_features", None):  # Qwen3-VL: every deepstack set keeps the same rows
        layers = zip(image_out.deepstack_features, video_out.deepstack_features, strict=True)
        sets = [kept_rows(list(i), list(v)) for i, v in layers]
        encoder_outputs["image"]["deepstack_features"] = [tuple(i) for i, _ in sets]
        encoder_outputs["video"]["deepstack_features"] = [tuple(v) for _, v in sets]
    if method == "evs":  # frame 0 whole, and at 0.3 of 3 frames of 24 later frames keep few or none
        assert kept[1][:24].tolist() == list(range(24)) and kept[1].numel() == 24
    born_short = mrope_born_short_logits(model, batch, index, encoder_outputs)
    assert valid.sum(1).max() < batch["input_ids"].shape[1]
    assert_close(pruned[valid], born_short[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "unit,prompt,noun",
    [
        ("video", [3, Video(2, (16, 16)), 4], "1 videos"),
        ("frame", [3, Video(2, (16, 16)), 4], "2 video frames"),
        ("video", [3, Image((16, 16)), 2, Video(2, (16, 16)), 4], "2 images and videos"),
    ],
)
def test_the_whole_budget_warning_names_videos_and_frames(unit, prompt, noun):
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [prompt])
    with vtprune.wrap(model, "random", keep=10_000, budget_unit=unit):
        with pytest.warns(UserWarning, match=rf"of the {noun} in this batch"):
            model(**batch)
