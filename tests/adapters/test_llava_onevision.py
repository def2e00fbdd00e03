"""LLaVA-OneVision adapter: any-res images on a SigLIP tower (no [CLS]), and videos pruned as a whole or frame by
frame."""

from __future__ import annotations

import pytest

import vtprune
from tests.helpers import Image, Video, make_batch, tiny_model


def test_video_frames_are_budgeted_one_by_one_and_the_final_newline_stays():
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Video(3), 4]])
    with vtprune.wrap(model, "uniform", keep=4) as pruning:  # the default: one budget per video
        model(**batch)
    assert pruning.last.items == [{"sample": 0, "modality": "video", "num_tokens": 49, "frames": [16, 16, 17]}]
    [kept] = pruning.last.stages[0].kept_per_item
    assert kept.numel() == 5 and int(kept[-1]) == 48  # 4 + the newline
    with vtprune.wrap(model, "uniform", keep=4, budget_unit="frame") as pruning:
        model(**batch)
    items, stage = pruning.last.items, pruning.last.stages[0]
    assert [i["modality"] for i in items] == ["video"] * 3
    assert [i["num_tokens"] for i in items] == [16, 16, 17]  # 8 x 8 patches pooled to 4 x 4, then one newline
    assert [k.numel() for k in stage.kept_per_item] == [4, 4, 5]
    assert 16 in stage.kept_per_item[2].tolist()  # the newline


def test_images_keep_their_any_res_grids_and_newlines():
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Image((32, 48)), 4]])
    with vtprune.wrap(model, "random", keep=6) as pruning:
        model(**batch)
    (grids,) = pruning.last.item_grids
    assert grids[0] == (0, 8, 8, 8) and len(grids) == 2  # base view, then the unpadded high-res grid
    newlines = grids[1][1]  # one per high-res row
    assert pruning.last.stages[0].kept_per_item[0].numel() == 6 + newlines


@pytest.mark.parametrize("method", ["vtc_cls", "fastervlm", "visionzip"])
def test_cls_methods_refuse_with_the_methods_that_apply(method):
    model = tiny_model("llava_onevision")
    with pytest.raises(ValueError, match="LLaVA-OneVision towers have no \\[CLS\\] token; methods that apply"):
        vtprune.wrap(model, method, keep=4)


def test_pool_before_the_projector_refuses_videos():
    model = tiny_model("llava_onevision")
    with vtprune.wrap(model, "pool", keep=4, where="before"):
        model(**make_batch(model, [[3, Image((32, 48)), 4]]))  # images pool before the projector
        with pytest.raises(ValueError, match="where='before' pools the tower's patch features of images"):
            model(**make_batch(model, [[3, Video(2), 4]]))
