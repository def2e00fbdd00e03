"""ViT-side token reduction (EViT, ToMe) on timm, open_clip and transformers CLIP vision transformers through
``vtprune.wrap``: the block forward, budgets, batches, errors (the methods' own rules: tests/methods/test_evit.py,
test_tome.py; inside LLaVA: tests/core/test_tower.py)."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from tests.methods.vit_common import timm_vit as _timm
from vtprune.core.vit import even_schedule
from vtprune.methods.evit import EViT
from vtprune.methods.tome import ToMe

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


def _open_clip():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=8, width=48, layers=4, heads=3, mlp_ratio=2.0,
                             output_dim=16).eval()  # fmt: skip


def _hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                              image_size=64, patch_size=8)  # fmt: skip
    return CLIPVisionModel(config).eval()


TOWERS = {
    "timm": _timm,
    "timm_layerscale_registers": lambda: _timm(init_values=0.5, reg_tokens=2),
    "open_clip": _open_clip,
    "hf_clip": _hf_clip,
}


def _run(model, images):
    """The tower's output tensor (transformers' CLIP returns a ModelOutput: its pooled [CLS])."""
    out = model(images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("method", ["evit", "tome", "flowcut"])
def test_keep_all_is_the_dense_tower_and_unwrap_restores_it(tower, method, images):
    model = TOWERS[tower]()
    with torch.no_grad():
        dense = _run(model, images)
        with vtprune.wrap(model, method, keep=64) as handle:
            same = _run(model, images)
        assert handle.last.seq_lens == [64 + handle.info.prefix] * 4
        torch.testing.assert_close(same, dense, atol=1e-5, rtol=1e-5)
        assert torch.equal(_run(model, images), dense)
    assert all("forward" not in block.__dict__ for block in handle.adapter.blocks())


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("method", ["evit", "tome", "flowcut"])
def test_reduction_follows_the_budget_and_batch_equals_each_image_alone(tower, method, images):
    model = TOWERS[tower]()
    with torch.no_grad(), vtprune.wrap(model, method, keep=16) as handle:
        batch = _run(model, images)
        prefix = handle.info.prefix
        lengths = handle.last.seq_lens
        origin = handle.last.origin
        alone = torch.cat([_run(model, images[i : i + 1]) for i in range(len(images))])
    assert lengths[0] == 64 + prefix and lengths == sorted(lengths, reverse=True) and lengths[-1] > 16 + prefix - 1
    assert list(handle.plan.values())[-1] == 16
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batch, _run(TOWERS[tower](), images), atol=1e-4)  # it did reduce
    # each row's representative: prefix rows first and unchanged, every other one a distinct patch row
    assert origin.shape == (len(images), 16 + prefix)
    assert origin[:, :prefix].tolist() == [list(range(prefix))] * len(images)
    for row in origin:
        assert row.unique().numel() == row.numel() and bool((row[prefix:] >= prefix).all())


def test_schedules():
    assert even_schedule(4, 0, 64, 16) == {0: 52, 1: 40, 2: 28, 3: 16}
    assert even_schedule(4, 2, 10, 4) == {2: 7, 3: 4}
    from vtprune.core.vit import ViTInfo

    info = ViTInfo("timm_vit", 12, 196, 1, 3)
    assert EViT().schedule(info, 67) == {3: 137, 6: 96, 9: 67}  # keep rate 0.7 per stage, as the authors
    assert ToMe(r=8).schedule(info, 196) == {b: 196 - 8 * (b + 1) for b in range(12)}  # the authors' r knob
    with pytest.raises(ValueError, match="cannot be reached"):
        ToMe().schedule(ViTInfo("timm_vit", 1, 196, 1, 3), 4)  # one block halves at most


def test_bad_inputs_name_the_parameter(images):
    model = _timm()
    with pytest.raises(ValueError, match=r"unknown ViT method 'fastv' \('fastv' prunes a VLM's visual tokens: wrap a VLM with it\); methods for vision transformers: evit, flowcut, tome"):
        vtprune.wrap(model, "fastv", keep=8)
    with pytest.raises(ValueError, match="keep"):
        vtprune.wrap(model, "tome", keep=0)
    with pytest.raises(ValueError, match=r"evit: blocks must lie in \[0, 3\]"):
        vtprune.wrap(model, "evit", keep=8, blocks=(1, 7))
    with pytest.raises(ValueError, match=r"tome: unknown option\(s\) layer; allowed: proportional, r, start"):
        vtprune.wrap(model, "tome", keep=8, layer=2)
    handle = vtprune.wrap(model, "tome", keep=8)
    with pytest.raises(ValueError, match="already wrapped"):
        vtprune.wrap(model, "evit", keep=8)
    handle.unwrap()
    with pytest.raises(ValueError, match="'token' pooling"):
        vtprune.wrap(_timm(global_pool="avg"), "tome", keep=8)
    with pytest.raises(ValueError, match="global_pool='map'.*'token' pooling"):
        vtprune.wrap(_timm(global_pool="map", class_token=False), "tome", keep=8)
    from vtprune.core.registry import make_method
    from vtprune.testing import tiny_model

    with pytest.raises(ValueError, match="'tome' is for vision transformers: pass it to vtprune.wrap"):
        make_method("tome")
    with pytest.raises(ValueError, match="reduce the CLIP tower of LLaVA-1.5 only, not Qwen2-VL"):
        vtprune.wrap(tiny_model("qwen2_vl"), "tome", keep=8)
    assert math.isfinite(float(model(images).sum()))
