"""ViT-side token reduction (EViT, ToMe) on timm, open_clip and transformers CLIP vision transformers through
``vtprune.wrap``; inside LLaVA see tests/test_tower.py."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.core.vit import ReduceContext, even_schedule
from vtprune.methods.evit import EViT
from vtprune.methods.tome import ToMe

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


def _timm(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**options, **kwargs}).eval()


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
@pytest.mark.parametrize("method", ["evit", "tome"])
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
@pytest.mark.parametrize("method", ["evit", "tome"])
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


def _context(x, keys, queries=None, sizes=None, prefix=1, target=2, proportional=False):
    batch, rows, _ = x.shape
    queries = keys if queries is None else queries
    sizes = torch.ones(batch, rows) if sizes is None else sizes
    origin = torch.arange(rows).expand(batch, -1) + 10  # representatives need not be 0 .. rows-1
    return ReduceContext(0, x, keys[:, None], queries[:, None], sizes, origin, prefix, target, proportional)


def test_tome_merges_each_a_row_into_its_most_similar_b_row_weighted_by_size():
    # rows: [CLS], then A/B alternate: 1 A, 2 B, 3 A, 4 B, 5 A, 6 B; keys make 3~4 and 5~2 near-twins
    keys = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                          [0, 0, 0.1, 1], [0, 0, 1, 0.05], [0, 1, 1, 1]]])  # fmt: skip
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    sizes = torch.tensor([[1.0, 1, 1, 2, 3, 1, 1]])
    new_x, new_sizes, origin = ToMe().reduce(_context(x, keys, sizes=sizes, target=4))
    # A rows are the even ones (0 = [CLS], protected), B the odd ones; the reference below matches by brute force
    a_best = {}
    unit = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    for a in (2, 4, 6):
        scores = {b: float(unit[a] @ unit[b]) for b in (1, 3, 5)}
        a_best[a] = max(scores, key=scores.get), max(scores.values())
    merged = sorted(a_best, key=lambda a: -a_best[a][1])[:2]  # r = 6 - 4 = 2
    expected_rows, expected_sizes, slot_of = [], [], {}
    for row in range(7):
        if row not in merged:
            slot_of[row] = len(expected_rows)
            expected_rows.append([row])
    for a in merged:
        expected_rows[slot_of[a_best[a][0]]].append(a)
    for slot, members in enumerate(expected_rows):
        weights = sizes[0, members]
        expected = (x[0, members] * weights[:, None]).sum(0) / weights.sum()
        torch.testing.assert_close(new_x[0, slot], expected)
        expected_sizes.append(float(weights.sum()))
    assert new_sizes[0].tolist() == expected_sizes and new_x.shape == (1, 5, 2)
    assert origin[0].tolist() == [10 + members[0] for members in expected_rows]  # a merged row stays where B was
    assert new_sizes.sum() == sizes.sum()  # every patch is still counted once


def test_tome_never_merges_prefix_rows():
    keys = torch.ones(1, 9, 4)  # every row identical: only the prefix rule decides
    x = torch.randn(1, 9, 3)
    new_x, sizes, _ = ToMe().reduce(_context(x, keys, prefix=3, target=3))
    torch.testing.assert_close(new_x[0, :3], x[0, :3])
    assert sizes[0, :3].tolist() == [1, 1, 1] and sizes.sum() == 9


def test_tome_with_proportional_attention_merging_twins_changes_nothing():
    """Two identical rows merged into one of size 2 attend and are attended exactly as the pair did."""
    model = _timm(depth=3)
    with torch.no_grad():
        model.pos_embed.zero_()
        half = torch.randn(2, 3, 64, 32)
        # every patch equals its right neighbour: columns 2j and 2j+1 of the 8 x 8 patch grid are twins
        images = half.view(2, 3, 64, 4, 8).repeat_interleave(2, dim=3).reshape(2, 3, 64, 64)
        dense = model.forward_features(images)[:, 0]
        with vtprune.wrap(model, "tome", keep=32) as handle:
            handle.plan = {0: 32}  # merge the 32 twin pairs in the first block only
            merged = model.forward_features(images)[:, 0]
            assert handle.last.seq_lens == [65, 33, 33]
        with vtprune.wrap(model, "tome", keep=32, proportional=False) as handle:
            handle.plan = {0: 32}
            plain = model.forward_features(images)[:, 0]
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)
    assert (plain - dense).abs().max() > 1e-3  # without size weighting the merged pair loses half its weight


def test_evit_keeps_the_most_attended_rows_and_fuses_the_rest_by_attention():
    # [CLS] query = e0; keys give the patch rows logits 0, 3, 1, 2, 5 (scaled by 1/sqrt(d) = 1/2 for d=4)
    logits = torch.tensor([0.0, 0.0, 3.0, 1.0, 2.0, 5.0])
    keys = torch.zeros(1, 6, 4)
    keys[0, :, 0] = logits * 2
    queries = torch.zeros(1, 6, 4)
    queries[0, 0, 0] = 1.0
    x = torch.randn(1, 6, 3)
    new_x, sizes, origin = EViT().reduce(_context(x, keys, queries, target=3))
    attention = logits.softmax(-1)[1:]  # [CLS]'s attention to the 5 patches
    kept = [5, 2]  # the two largest logits (5 and 3), kept in raster order -> rows 2, 5
    torch.testing.assert_close(new_x[0, 1:3], x[0, sorted(kept)])
    rest = [1, 3, 4]
    fused = (x[0, rest] * attention[[r - 1 for r in rest]][:, None]).sum(0)  # the authors' unnormalised sum
    torch.testing.assert_close(new_x[0, 3], fused)
    torch.testing.assert_close(new_x[0, 0], x[0, 0])
    assert sizes[0].tolist() == [1, 1, 1, 3]
    assert origin[0].tolist() == [10, 12, 15, 11]  # [CLS], the kept rows, the fused row where its first member was


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
    with pytest.raises(ValueError, match=r"unknown ViT method 'fastv' \('fastv' prunes a VLM's visual tokens: wrap a VLM with it\); methods for vision transformers: evit, tome"):
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
    from vtprune.testing import tiny_model

    from vtprune.core.registry import make_method

    with pytest.raises(ValueError, match="'tome' is for vision transformers: pass it to vtprune.wrap"):
        make_method("tome")
    with pytest.raises(ValueError, match="reduce the CLIP tower of LLaVA-1.5 only, not Qwen2-VL"):
        vtprune.wrap(tiny_model("qwen2_vl"), "tome", keep=8)
    assert math.isfinite(float(model(images).sum()))
