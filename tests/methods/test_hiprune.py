"""HiPrune: buffers (the authors' flat-index rule and the grid rule), anchors + buffers + deep registers on hand-made
signals, references built as the authors' code on LLaVA and Qwen2.5-VL, keep = all, and the families it serves."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers.vision_utils import get_vision_window_index

import vtprune
import vtprune.methods.hiprune  # registers "hiprune" (not yet imported by vtprune.methods)
from tests.helpers import FAMILIES, Image, make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import GridPart, Layout, VisualItem
from vtprune.core.registry import ModelInfo
from vtprune.methods.hiprune import HiPrune, neighbours

APPLIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")
TINY = ModelInfo(
    family="llava", num_layers=4, has_cls_token=True, mrope=False, vision_layers=3, vision_feature_layer=1,
    tower_attention=True,
)  # fmt: skip
QWEN = ModelInfo(
    family="qwen_vl", num_layers=28, has_cls_token=False, mrope=True, vision_layers=32, vision_feature_layer=31,
    family_name="Qwen2-VL / Qwen2.5-VL", tower_attention=True,
)  # fmt: skip


def _view(n: int, budget: int, grids=(), groups=None, received=None) -> ItemView:
    item = VisualItem(0, 0, "image", n, 0, grids)
    return ItemView(
        item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), budget, groups=groups,
        received_attention=received,
    )  # fmt: skip


def _context(view: ItemView, model: ModelInfo = TINY) -> PruneContext:
    n = view.num_tokens
    layout = Layout(
        token=torch.arange(n)[None], valid=torch.ones(1, n, dtype=torch.bool), item=torch.zeros(1, n, dtype=torch.long),
        item_token=torch.arange(n)[None], positions=torch.arange(n)[None], shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )  # fmt: skip
    return PruneContext(stage=HiPrune().stages(model, 1)[0], model=model, layout=layout, items=[view])


GRID_4X4 = (GridPart(0, 4, 4, 4),)


@pytest.mark.parametrize(
    "anchor,flat,grid",
    [
        (5, [1, 4, 6, 9], [1, 4, 6, 9]),  # inside: the 4 neighbours either way
        (7, [3, 6, 8, 11], [3, 6, 11]),  # end of row 1: flat wraps to the next row's first token (8)
        (8, [4, 7, 9, 12], [4, 9, 12]),  # start of row 2: flat wraps back to the previous row's last (7)
        (1, [0, 2, 5], [0, 2, 5]),  # top row: flat clamps the one above (-3) to token 0
        (2, [0, 1, 3, 6], [1, 3, 6]),  # ... even when token 0 is no neighbour at all
        (14, [10, 13, 15], [10, 13, 15]),  # bottom row: 18 clamps to 15, already the right neighbour
        (13, [9, 12, 14, 15], [9, 12, 14]),  # ... and 17 clamps to the last token 15
    ],
)
def test_buffers_follow_the_authors_flat_indices_or_the_grid(anchor, flat, grid):
    view = _view(16, 8, GRID_4X4)
    anchors = torch.tensor([anchor])
    assert sorted(set(neighbours(view, anchors, "flat").tolist()) - {anchor}) == flat
    assert sorted(set(neighbours(view, anchors, "grid").tolist())) == grid


def test_buffers_use_each_grid_of_an_item_and_skip_tokens_it_no_longer_has():
    # LLaVA-NeXT-like: a 2 x 2 base grid, then a 2 x 3 grid whose rows end in a newline (row stride 4)
    grids = (GridPart(0, 2, 2, 2), GridPart(4, 2, 3, 4))
    view = _view(12, 4, grids)
    assert sorted(neighbours(view, torch.tensor([9]), "grid").tolist()) == [5, 8, 10]  # (1, 1) of the second grid
    assert sorted(neighbours(view, torch.tensor([0]), "grid").tolist()) == [1, 2]
    # the same image after tokens 5 and 10 were dropped: current indices of the neighbours it still has
    kept = torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9, 11])
    item = VisualItem(0, 0, "image", 12, 0, grids)
    shorter = ItemView(item, 0, kept, torch.arange(10), torch.ones(10, dtype=torch.bool), 4)
    assert neighbours(shorter, torch.tensor([8]), "grid").tolist() == [7]  # token 9 -> token 8 at index 7


def test_anchors_and_buffers_then_the_deep_layers_registers():
    shallow = torch.zeros(16)
    shallow[7] = 1.0  # the anchor: end of row 1
    deep = torch.linspace(0.0, 1.0, 16)  # prefers high indices, anchors and buffers excluded
    deep[0] = 2.0
    view = _view(16, 10, GRID_4X4, received=torch.stack([shallow, deep]))
    # budget 10, alpha 0.5 -> round(10 * 0.5 / 5) = 1 anchor; flat buffers 6, 8, 3, 11; 5 registers by the deep layer
    kept = sorted(HiPrune(alpha=0.5).select(_context(view))[0].tolist())
    assert kept == sorted([7, 6, 8, 3, 11] + [0, 15, 14, 13, 12])
    kept = sorted(HiPrune(alpha=0.5, buffer="grid").select(_context(view))[0].tolist())
    assert kept == sorted([7, 6, 3, 11] + [0, 15, 14, 13, 12, 10])  # no wrap: one register more
    # the authors' default alpha: round(10 * 0.1 / 5) = 0 anchors, the deep layer alone
    assert sorted(HiPrune().select(_context(view))[0].tolist()) == sorted(deep.topk(10).indices.tolist())


def test_views_share_the_image_budget_and_keep_buffers_inside_their_view():
    # two views of one item on one 2 x 6 grid: columns 0-3 view 0, columns 4-5 view 1 (crops side by side)
    groups = torch.tensor([0, 0, 0, 0, 1, 1] * 2)
    shallow = torch.zeros(12)
    shallow[3] = 1.0  # view 0's anchor sits at its right border: its right neighbour 4 belongs to view 1
    shallow[10] = 0.9  # view 1's anchor
    deep = torch.arange(12.0)
    view = _view(12, 9, (GridPart(0, 2, 6, 6),), groups, torch.stack([shallow, deep]))
    # 9 tokens over views of 8 and 4: 6 + 3; alpha 1 -> anchors round(6 / 5) = 1 and round(3 / 5) = 1
    kept = HiPrune(alpha=1.0, buffer="grid").select(_context(view))[0].tolist()
    in_view0 = sorted(t for t in kept if groups[t] == 0)
    in_view1 = sorted(t for t in kept if groups[t] == 1)
    assert in_view0 == sorted([3, 2, 9] + [8, 7, 6])  # anchor 3 + buffers 2 and 9 (not 4), registers by deep
    assert in_view1 == sorted([10, 11, 4])  # anchor 10 + buffers 11, 4 (9 is view 0's); budget 3 cuts 5


def test_defaults_follow_the_authors_and_scale_with_the_tower():
    llava = dataclasses.replace(LLAVA, tower_attention=True)
    # CLIP layer 9 of 24 (1-based) and the penultimate layer LLaVA projects
    assert HiPrune().stages(llava, 64)[0].vision_received == (8, 22)
    assert HiPrune().stages(QWEN, 0.334)[0].vision_received == (15, 31)  # block 16 of 32 and the last block
    assert HiPrune().stages(TINY, 8)[0].vision_received == (0, 1)  # round(9 * 3 / 24) = 1
    assert HiPrune(object_layer=2).stages(TINY, 8)[0].vision_received == (1,)  # the deep layer itself
    with pytest.raises(ValueError, match=r"object_layer=4 must be a 1-based tower layer in \[1, 3\]"):
        HiPrune(object_layer=4).stages(TINY, 8)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        HiPrune(alpha=1.5)
    with pytest.raises(ValueError, match=r"buffer must be one of \('flat', 'grid'\)"):
        HiPrune(buffer="cross")
    gemma = ModelInfo(family="gemma3", num_layers=4, has_cls_token=False, mrope=False, family_name="Gemma 3")
    with pytest.raises(ValueError, match=r"the attention they receive inside the vision tower.*not Gemma 3's"):
        HiPrune().stages(gemma, 8)


def _authors_selection(shallow: torch.Tensor, deep: torch.Tensor, budget: int, alpha: float, width: int) -> list[int]:
    """The authors' encode_images / Qwen HiPrune block for one image (flat indices, clamp, unique, deep - mask)."""
    n = shallow.numel()
    anchors = torch.topk(shallow, round(budget * alpha / 5)).indices
    candidates = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    candidates = torch.unique(candidates)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[candidates] = True
    registers = torch.topk(deep - mask.int(), budget - candidates.numel()).indices
    return sorted(torch.cat([candidates, registers]).tolist())


def test_matches_the_authors_code_on_llava_from_eager_attention_maps():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep, alpha = 30, 0.5  # round(30 * 0.5 / 5) = 3 anchors
    with vtprune.wrap(model, "hiprune", keep=keep, alpha=alpha) as pruning:
        model(**batch)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    attentions = tower(batch["pixel_values"], output_attentions=True).attentions
    # the authors' "global attention": mean over heads, then over all 65 queries ([CLS] included), [CLS] key dropped
    shallow = attentions[0].mean(dim=1).mean(dim=1)[:, 1:]  # object layer round(9 * 3 / 24) = 1 (1-based)
    deep = attentions[-2].mean(dim=1).mean(dim=1)[:, 1:]  # mm_vision_select_layer = -2
    kept = pruning.last.stages[0].kept_per_item
    assert len(kept) == 3
    for image, tokens in enumerate(kept):
        assert tokens.tolist() == _authors_selection(shallow[image], deep[image], keep, alpha, 8)


@pytest.mark.parametrize("family", [f for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v") if f in FAMILIES])
def test_matches_the_authors_qwen_code_with_dense_attention(family):
    """The authors' Qwen2.5-VL path: dense softmax(q k^T / sqrt(d)) over the whole image in every block (Qwen2.5-VL's
    windows ignored), mean over heads, sum over queries, mean over each 2 x 2 merge unit, back to raster order."""
    model = tiny_model(family)
    batch = make_batch(model, [[3, Image((32, 32)), 4]])  # 16 x 16 patches, 8 x 8 tokens (Qwen2.5-VL: 4 windows)
    keep, alpha = 0.5, 0.5  # 32 of 64 tokens, round(32 * 0.5 / 5) = 3 anchors
    captured = []
    visual = model.model.visual
    hooks = [
        block.attn.register_forward_pre_hook(
            lambda m, args, kwargs: captured.append((m, args[0], kwargs["position_embeddings"])), with_kwargs=True
        )
        for block in visual.blocks
    ]
    with vtprune.wrap(model, "hiprune", keep=keep, alpha=alpha) as pruning:
        model(**batch)
    for hook in hooks:
        hook.remove()
    grid = batch["image_grid_thw"]
    config = model.config.vision_config
    reverse = torch.arange(grid.prod() // 4)
    if hasattr(config, "window_size"):
        window_index, _ = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
        reverse = torch.argsort(window_index)
    attn_list = []
    for module, hidden, (cos, sin) in captured[: len(visual.blocks)]:
        rows = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(rows, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.permute(1, 0, 2), k.permute(1, 0, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        weights = weights.mean(dim=0).sum(dim=0)
        attn_list.append(weights.view(weights.shape[0] // 4, -1).mean(dim=-1)[reverse])
    object_layer = round(16 * len(visual.blocks) / 32)
    shallow, deep = attn_list[object_layer - 1], attn_list[-1]
    width = int(grid[0][2]) // config.spatial_merge_size
    expected = _authors_selection(shallow, deep, round(64 * keep), alpha, width)
    assert pruning.last.stages[0].kept_per_item[0].tolist() == expected


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in APPLIES])
def test_keep_all_equals_dense(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, "hiprune", keep=1.0):
        assert_close(model(**batch).logits, dense)


def test_runs_where_the_tower_attention_is_mapped_and_refuses_elsewhere():
    for family in FAMILIES:
        model = tiny_model(family)
        batch = make_batch(model, samples_for(family)[:2])
        if family not in APPLIES:
            with pytest.raises(ValueError, match="hiprune ranks tokens by the attention they receive inside"):
                vtprune.wrap(model, "hiprune", keep=0.25)
            continue
        with vtprune.wrap(model, "hiprune", keep=0.25) as pruning:
            model(**batch)
            stage = pruning.last.stages[0]
            assert stage.layer is None and all(len(k) for k in stage.kept_per_item)
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert generated.shape[1] == batch["input_ids"].shape[1] + 3
