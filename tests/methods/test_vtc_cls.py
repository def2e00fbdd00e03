"""VTC-CLS: the summed [CLS] rows of its tower layers; [CLS] methods refuse towers without one."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA, QWEN, _single_item_context, _tower_cls_attention
from vtprune.core.registry import Stage


def test_vtc_cls_sums_the_cls_rows_of_its_layers():
    # layer 1 alone favours tokens 0 and 1, layer 2 alone token 3; the sum favours 1 and 3
    rows = torch.tensor([[0.40, 0.30, 0.00, 0.05, 0.25], [0.00, 0.25, 0.10, 0.60, 0.05]])
    ctx = _single_item_context(5, 2, Stage(layer=None, vision_layers=(21, 22)), cls_attention=rows)
    assert sorted(vtprune.VTCCLS().select(ctx)[0].tolist()) == [1, 3]


def test_vtc_cls_default_layers_follow_the_repository():
    stage = vtprune.VTCCLS().stages(LLAVA, 64)[0]
    assert stage.layer is None and stage.vision_layers == tuple(range(16, 23))  # attentions[16:-1] of 24
    assert vtprune.VTCCLS(start_layer=20).stages(LLAVA, 64)[0].vision_layers == (20, 21, 22)
    with pytest.raises(ValueError, match=r"start_layer=23 must lie in \[0, 22\]"):
        vtprune.VTCCLS(start_layer=23).stages(LLAVA, 64)


@pytest.mark.parametrize("method", ["vtc_cls", "fastervlm"])
def test_cls_methods_refuse_towers_without_cls(method):
    with pytest.raises(ValueError, match=r"Qwen2-VL / Qwen2.5-VL towers have no \[CLS\] token; methods that apply"):
        vtprune.method_class(method)().stages(QWEN, 64)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*fastv.*mmtok"):
        vtprune.wrap(model, method, keep=4)


def test_vtc_cls_matches_a_reference_from_eager_attention_maps():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep = 7
    with vtprune.wrap(model, "vtc_cls", keep=keep, start_layer=0) as pruning:
        model(**batch)
    cls = _tower_cls_attention(model, batch["pixel_values"])  # [3 layers, 3 images, 65]
    scores = cls[0:2, :, 1:].sum(0)  # layers start..penultimate (feature layer -2 of 3), patches only
    for image, kept in enumerate(pruning.last.stages[0].kept_per_item):
        assert torch.equal(kept, scores[image].topk(keep).indices.sort().values)
