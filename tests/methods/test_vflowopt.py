"""VFlowOpt: the sinks' emitted attention, patch entropy and cell recycling on hand-made inputs, the authors'
schedule and budget accounting, plain-loop references on LLaVA-OneVision (the authors' model) and LLaVA-1.5 (with
the entropy term) from eager tower attention, keep = all, and the families it serves or refuses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import FAMILIES, Image, Video, make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA, QWEN
from vtprune.core.budget import stage_budgets
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import GridPart, Layout, VisualItem
from vtprune.core.registry import Merged, ModelInfo
from vtprune.methods import vflowopt  # registers "vflowopt" (not in methods/__init__)
from vtprune.methods.vflowopt import (
    AUTHORS_PRESETS,
    PatchEntropy,
    SinkAttention,
    VFlowOpt,
    fill_budget,
)

APPLIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")
TINY = ModelInfo(
    family="llava", num_layers=4, has_cls_token=True, mrope=False, vision_layers=3, vision_feature_layer=1,
    tower_attention=True,
)  # fmt: skip
OV7B = ModelInfo(
    family="llava_onevision", num_layers=28, has_cls_token=False, mrope=False, vision_layers=26,
    vision_feature_layer=25, family_name="LLaVA-OneVision", tower_attention=True,
)  # fmt: skip


# -- the importance map --------------------------------------------------------------------------------------------
def _dense_sink_map(queries: torch.Tensor, keys: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """The authors' SigLipEncoderLayer rule on a full eager map: mean over heads, received = mean over queries."""
    attention = torch.softmax(queries @ keys.transpose(1, 2) * scale, dim=-1).mean(0)
    received = attention.mean(0)
    sinks = torch.nonzero(received > threshold * received.mean(), as_tuple=True)[0]
    return attention[sinks].mean(0)


def test_importance_is_the_attention_the_sinks_emit():
    heads, tokens, dim = 2, 6, 4
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(heads, tokens, dim, generator=generator)
    keys = torch.randn(heads, tokens, dim, generator=generator) * 0.1
    keys[:, 2] = queries.mean(1) * 3  # every query points at token 2: the sink
    attention = torch.softmax(queries @ keys.transpose(1, 2), dim=-1).mean(0)
    assert attention.mean(0).argmax() == 2 and attention.mean(0)[2] > 2 * attention.mean(0).mean()
    # one sink: the map is the sink's own (head-averaged) attention row
    assert_close(SinkAttention(2.0)(queries, keys, 1.0), attention[2])
    # a lower threshold admits more sinks: the mean of their rows, as the authors' dense rule
    for threshold in (0.5, 0.9, 1.1):
        expected = _dense_sink_map(queries, keys, 1.0, threshold)
        assert_close(SinkAttention(threshold)(queries, keys, 1.0), expected)
    # ours: no token over the threshold -> the most-attended token is the sink (the authors' mean would be NaN)
    assert_close(SinkAttention(1000.0)(queries, keys, 1.0), attention[2])


def test_sink_rows_go_in_chunks_with_the_same_result(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(3, 40, 8, generator=generator), torch.randn(3, 40, 8, generator=generator)
    whole = SinkAttention(0.9)(queries, keys, 0.35)
    monkeypatch.setattr(vflowopt, "_CHUNK_ELEMENTS", 3 * 40 * 2)  # two sink rows per chunk
    assert_close(SinkAttention(0.9)(queries, keys, 0.35), whole)
    assert_close(whole, _dense_sink_map(queries, keys, 0.35, 0.9))


def test_patch_entropy_follows_the_authors_grey_levels():
    patches = torch.zeros(4, 3, 2, 2)
    # patch 0: one grey level (0 bits); patch 1: two levels, half each (1 bit); patch 2: four levels (2 bits)
    patches[1, :, 0] = 30 / 255
    patches[2] = torch.tensor([[0.0, 10.0], [20.0, 30.0]]) / 255
    # patch 3: half of it at -10/255, which the authors' uint8 cast wraps to 246: a second level next to 0 (1 bit)
    patches[3, :, 0] = -10 / 255
    assert (patches[3] * 255).to(torch.uint8).max() == 246
    assert_close(PatchEntropy()(patches), torch.softmax(torch.tensor([0.0, 1.0, 2.0, 1.0]), 0), atol=1e-5, rtol=0)


# -- recycling -----------------------------------------------------------------------------------------------------
GRID_4X4 = (GridPart(0, 4, 4, 4),)


def _view(importance: torch.Tensor, budget: int, grids=GRID_4X4, features=None, modality="image") -> ItemView:
    n = importance.numel()
    item = VisualItem(0, 0, modality, n, 0, grids)
    features = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2) if features is None else features
    return ItemView(
        item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), budget, features=features,
        vision_maps=importance[None],
    )  # fmt: skip


def _tower_context(view: ItemView, method: VFlowOpt) -> PruneContext:
    n = view.num_tokens
    layout = Layout(
        token=torch.arange(n)[None], valid=torch.ones(1, n, dtype=torch.bool), item=torch.zeros(1, n, dtype=torch.long),
        item_token=torch.arange(n)[None], positions=torch.arange(n)[None], shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )  # fmt: skip
    return PruneContext(stage=method.stages(TINY, 1)[0], model=TINY, layout=layout, items=[view])


def test_removed_tokens_are_recycled_per_cell_into_their_most_important_member():
    # 4 x 4 grid, cell 2: four 2 x 2 cells; importance rises with the token index except for token 5 (cell 0)
    importance = torch.arange(1.0, 17.0)
    importance[5] = 30.0
    method = VFlowOpt(cell=2.0)
    merged = method.select(_tower_context(_view(importance, budget=8), method))[0]
    assert isinstance(merged, Merged)
    # authors: int(16 / 2^2) = 4 cells estimated, so the 8 - 4 = 4 most important stay as they are (5, 15, 14, 13)
    # and the 12 others are recycled; each cell's most important removed token takes its group's weighted mean
    rows = {int(t): f for t, f in zip(merged.indices, merged.features)}
    assert sorted(rows) == sorted([5, 15, 14, 13] + [4, 7, 11, 12])
    # cells: {0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}, minus the tokens that stay
    groups = {4: [0, 1, 4], 7: [2, 3, 6, 7], 12: [8, 9, 12], 11: [10, 11]}
    for representative, members in groups.items():
        weights = importance[members]
        expected = (weights[:, None] * torch.tensor(members, dtype=torch.float32)[:, None]).sum(0) / weights.sum()
        assert_close(rows[representative], expected.repeat(2))
    for token in (5, 15, 14, 13):
        assert_close(rows[token], torch.full((2,), float(token)))
    assert merged.combined.tolist() == [False] * 4 + [True] * 4


def test_recycling_fills_the_budget_exactly_closest_to_the_authors_count():
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        importance = torch.rand(16, generator=generator)
        for budget in range(1, 16):
            method = VFlowOpt(cell=2.0)
            merged = method.select(_tower_context(_view(importance, budget), method))[0]
            assert merged.indices.numel() == budget and merged.indices.unique().numel() == budget
    # cells of 16 tokens in ascending importance: the 12 lowest in cell 0, then one each in cells 1 and 2, two in 3
    ranked = torch.tensor([0] * 12 + [1, 2, 3, 3])
    # keeping k leaves k + (cells among the 16 - k lowest): keeping 1 to 4 each empties a cell of the removed
    fills = [k + ranked[: 16 - k].unique().numel() for k in range(17)]
    assert fills == [4, 5, 5, 5, 5] + list(range(6, 17)) + [16]
    assert fill_budget(ranked, budget=5, authors=3) == 3  # the authors' count fills the budget: theirs
    assert fill_budget(ranked, budget=5, authors=0) == 1  # it does not: the closest count that does
    assert fill_budget(ranked, budget=5, authors=9) == 4
    assert fill_budget(ranked, budget=9, authors=2) == 8  # one count only
    assert fill_budget(ranked, budget=3, authors=0) == 0  # below the number of cells
    assert fill_budget(torch.full((5,), -1), budget=2, authors=0) == 2  # no grid: nothing recycled


def test_a_budget_below_the_cells_keeps_the_most_important_groups():
    importance = torch.arange(1.0, 17.0)  # the most important member of each cell: 5, 7, 13, 15
    method = VFlowOpt(cell=2.0)
    merged = method.select(_tower_context(_view(importance, budget=2), method))[0]
    assert sorted(merged.indices.tolist()) == [13, 15]
    weights = importance[[10, 11, 14, 15]]
    expected = (weights * torch.tensor([10.0, 11, 14, 15])).sum() / weights.sum()
    assert_close(merged.features[merged.indices.argsort()][1], expected.repeat(2))


def test_full_budget_video_frames_and_recycle_false_keep_plain_tokens():
    importance = torch.rand(16, generator=torch.Generator().manual_seed(3))
    method = VFlowOpt(cell=2.0)
    assert sorted(method.select(_tower_context(_view(importance, budget=16), method))[0].tolist()) == list(range(16))
    top = set(importance.topk(5).indices.tolist())
    frame = method.select(_tower_context(_view(importance, 5, modality="video"), method))[0]
    assert not isinstance(frame, Merged) and set(frame.tolist()) == top  # the authors' video path: plain top-k
    plain = VFlowOpt(cell=2.0, recycle=False)
    assert set(plain.select(_tower_context(_view(importance, 5), plain))[0].tolist()) == top


# -- schedule and options ------------------------------------------------------------------------------------------
def test_schedule_and_budget_reproduce_the_authors_configs():
    stages = VFlowOpt().stages(OV7B, 64)
    assert [s.layer for s in stages] == [None, 9, 18]
    assert all(s.vision_maps == ((25, SinkAttention(39.26492840997221)),) and not s.pixel_maps for s in stages)
    assert [s.layer for s in VFlowOpt().stages(dataclasses.replace(LLAVA, tower_attention=True), 1)] == [None, 10, 21]
    assert [s.layer for s in VFlowOpt().stages(TINY, 1)] == [None, 1, 3]
    # the authors' "10 %": vit_r = 0.1166 after the tower, x 0.6011 from layer 18, 10 % averaged over 28 layers
    tokens = 7290
    for retention, options in AUTHORS_PRESETS.items():
        specs = [(s.layer, s.scale) for s in VFlowOpt(**options).stages(OV7B, retention)]
        counts = stage_budgets(retention, tokens, specs, 28, "average")
        vit_r = {0.1: 0.11661529508161146, 0.25: 0.2651026358526424, 0.5: 0.7233201448753168}[retention]
        # their own schedules average 10.0 %, 25.07 % and 50.08 %
        assert abs(counts[0] / tokens - vit_r) < 2e-3
        average = (9 * counts[0] + 9 * counts[1] + 10 * counts[2]) / 28
        assert average <= retention * tokens and abs(average / tokens - retention) < 5e-4
    # the final budget: each stage keeps 1 / (later ratios) times it
    assert stage_budgets(60, 729, [(s.layer, s.scale) for s in stages], 28) == [100, 100, 60]


def test_bad_options_and_families_raise_clear_errors():
    with pytest.raises(ValueError, match=r"vflowopt: threshold must be a finite number > 0, got 0"):
        VFlowOpt(threshold=0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got -1"):
        VFlowOpt(alpha=-1)
    with pytest.raises(ValueError, match=r"cell must be a finite number >= 1, got 0.5"):
        VFlowOpt(cell=0.5)
    with pytest.raises(ValueError, match=r"ratios are the shares .* each in \(0, 1\]"):
        VFlowOpt(ratios=(1.0, 1.5))
    with pytest.raises(ValueError, match=r"recycle must be True or False"):
        VFlowOpt(recycle="yes")
    with pytest.raises(ValueError, match=r"must have one entry per LLM stage"):
        VFlowOpt(layers=(9,))
    with pytest.raises(ValueError, match=r"3 ratios need as many layers"):
        VFlowOpt(ratios=(1.0, 0.8, 0.5)).stages(OV7B, 64)
    assert [s.layer for s in VFlowOpt(ratios=(0.5,), layers=(2,)).stages(OV7B, 64)] == [None, 2]
    with pytest.raises(ValueError, match="layers must increase"):
        VFlowOpt(layers=(18, 9)).stages(OV7B, 64)
    with pytest.raises(ValueError, match=r"layers=30 is outside the model"):
        VFlowOpt(layers=(9, 30)).stages(OV7B, 64)
    with pytest.raises(ValueError, match=r"vit_layer=26 must be a 0-based tower layer in \[0, 25\]"):
        VFlowOpt(vit_layer=26).stages(OV7B, 64)
    assert VFlowOpt(vit_layer=3).stages(OV7B, 64)[0].vision_maps[0][0] == 3
    with pytest.raises(ValueError, match=r"alpha > 0 adds the patch entropy, .*LLaVA-OneVision \(not Qwen2-VL"):
        VFlowOpt(alpha=0.5).stages(dataclasses.replace(QWEN, tower_attention=True, vision_layers=32), 64)
    gemma = ModelInfo(family="gemma3", num_layers=4, has_cls_token=False, mrope=False, family_name="Gemma 3")
    with pytest.raises(ValueError, match=r"the attention the vision tower's sink tokens emit.*not Gemma 3's"):
        VFlowOpt().stages(gemma, 8)


# -- plain references from eager tower attention -------------------------------------------------------------------
def _eager_attention(tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Head-averaged eager attention maps of one tower layer, [views, T, T]."""
    tower.set_attn_implementation("eager")
    return tower(pixels, output_attentions=True).attentions[layer].mean(1)


def _sink_rows(attention: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    maps = []
    for view in attention:  # the authors' loop over views
        received = view.mean(0)
        sinks = [j for j in range(received.numel()) if received[j] > threshold * received.mean()]
        assert sinks, "the reference exercises the sink rule itself (the tests pick thresholds with sinks)"
        maps.append(view[sinks].mean(0))
    return maps


def _tower_stage(imp, selectable, cells, features, budget, cell, recycle):
    """The authors' recycling (sort, remove the lowest, group by cell, weighted mean into the group's argmax) with
    vtprune's exact budget; returns (kept tokens, {representative: merged feature})."""
    members = [i for i in range(len(imp)) if selectable[i]]
    structural = {i for i in range(len(imp)) if not selectable[i]}
    count = len(members)
    if budget >= count:
        return set(range(len(imp))), {}
    ascending = sorted(members, key=lambda i: imp[i])
    if not recycle:
        return set(ascending[count - budget :]) | structural, {}
    fills = [k + len({cells[i] for i in ascending[: count - k]}) for k in range(count + 1)]
    exact = [k for k in range(count + 1) if fills[k] == budget]
    kept_count = min(max(budget - int(count / cell**2), exact[0]), exact[-1])
    groups: dict = {}
    for i in ascending[: count - kept_count]:
        groups.setdefault(cells[i], []).append(i)
    merged = {}
    for group in groups.values():
        weights = torch.tensor([imp[i] for i in group])
        weights = weights / weights.sum()
        merged[max(group, key=lambda i: imp[i])] = (weights[:, None] * features[group]).sum(0)
    return set(ascending[count - kept_count :]) | set(merged) | structural, merged


def _llm_stage(imp, selectable, current: set, budget: int) -> set:
    prunable = sorted((i for i in current if selectable[i]), key=lambda i: imp[i])
    return {i for i in current if not selectable[i]} | set(prunable[max(0, len(prunable) - budget) :])


def _budgets(count: int, keep: float, ratios: tuple[float, ...]) -> list[int]:
    """Tokens after each stage: the final share of ``count``, times 1 / (the later ratios) before it."""
    final = max(1, round(keep * count))
    return [min(count, max(1, round(1 / math.prod(ratios[i:]) * final))) for i in range(len(ratios) + 1)]


def _check(pruning, references: list[tuple[list[float], list[bool], set, dict, list[int]]], ratios) -> None:
    """Every stage's kept tokens and the recycled features against the plain loops, item by item."""
    record = pruning.last.stages
    assert [s.layer for s in record] == [None, 1, 3]
    for item, (imp, selectable, kept, merged, budgets) in enumerate(references):
        assert set(record[0].kept_per_item[item].tolist()) == kept, item
        if merged:
            got = record[0].merges[item]
            rows = {int(t): f for t, f in zip(got.indices, got.features)}
            for representative, feature in merged.items():
                assert_close(rows[representative], feature, rtol=1e-4, atol=1e-5)
        for stage, budget in zip(record[1:], budgets[1:]):
            kept = _llm_stage(imp, selectable, kept, budget)
            assert set(stage.kept_per_item[item].tolist()) == kept, (item, stage.layer)


def test_matches_a_plain_reference_on_llava_onevision():
    """The authors' model: SigLIP layer = the projected one, any-res images packed with a newline of importance 1.0,
    cells on the base grid and on the unpadded grid (width with its newline column, as their ``local_w``), video
    frames pooled 2 x 2 and cut by plain top-k, then drops at LLM layers 1 and 3 (9 / 18 of 28 scaled to 4)."""
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[4, Image((32, 48)), 6], [2, Image((48, 32)), 3, Video(2), 2]])
    keep, threshold, cell, ratios = 0.2, 1.1, 3.0, (0.8, 0.5)
    options = {"threshold": threshold, "cell": cell, "ratios": ratios}
    with vtprune.wrap(model, "vflowopt", keep=keep, budget_unit="frame", **options) as pruning:  # frames one by one
        model(**batch)
    vlm, side = model.model, 8
    images = vlm.get_image_features(
        pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
    ).pooler_output
    views = [3, 3]  # base + 2 crops for both tiny images (the adapter test pins this down)
    pixels = torch.cat([batch["pixel_values"][i, :n] for i, n in enumerate(views)])
    frames = batch["pixel_values_videos"][0]
    with torch.no_grad():
        attention = _eager_attention(vlm.vision_tower, torch.cat([pixels, frames]), layer=2)  # 3 layers, select -1
    maps = torch.stack(_sink_rows(attention, threshold))  # [views + frames, 64]
    references = []
    image_maps = [m[..., None] for m in maps[:6].split(views)]
    packed, _ = vlm.pack_image_features(image_maps, batch["image_sizes"], image_newline=torch.tensor([-1.0]))
    for values, features in zip(packed, images):
        newline = (values[:, 0] == -1).tolist()
        imp = values[:, 0].masked_fill(values[:, 0] == -1, 1.0).tolist()  # the authors give newlines 1.0
        selectable = [not n for n in newline]
        local_w = newline[side * side :].index(True) + 1
        cells = []
        for i in range(len(imp)):
            if i < side * side:
                cells.append((0, math.floor(i // side / cell), math.floor(i % side / cell)))
            else:
                j = i - side * side
                cells.append((1, math.floor(j // local_w / cell), math.floor(j % local_w / cell)))
        budgets = _budgets(sum(selectable), keep, ratios)
        kept, merged = _tower_stage(imp, selectable, cells, features, budgets[0], cell, recycle=True)
        assert merged, "the test should recycle"
        references.append((imp, selectable, kept, merged, budgets))
    pooled = F.interpolate(maps[6:].view(2, 1, side, side), size=[4, 4], mode="bilinear").flatten(1)
    for frame, values in enumerate(pooled):
        imp = values.tolist() + ([1.0] if frame == 1 else [])  # the video's newline ends its last frame
        selectable = [True] * 16 + ([False] if frame == 1 else [])
        budgets = _budgets(16, keep, ratios)
        kept, _ = _tower_stage(imp, selectable, [None] * len(imp), None, budgets[0], cell, recycle=False)
        references.append((imp, selectable, kept, {}, budgets))
    _check(pruning, references, ratios)


def _entropy(patch: torch.Tensor) -> float:
    levels = ((patch * 255).to(torch.uint8).float() * 0.3333).sum(0).round().long().flatten().tolist()
    total = len(levels)
    return -sum(c / total * math.log2(c / total + 1e-10) for c in (levels.count(v) for v in set(levels)))


def test_matches_a_plain_reference_on_llava_with_patch_entropy():
    """LLaVA-1.5: [CLS] among the tower's queries and keys, its column dropped; importance + alpha x softmax of the
    patch entropies; one 8 x 8 grid per image, recycled in 3 x 3 cells."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep, threshold, cell, ratios, alpha = 0.25, 1.0, 3.0, (0.75, 0.5), 0.02
    options = {"threshold": threshold, "cell": cell, "ratios": ratios, "alpha": alpha}
    with vtprune.wrap(model, "vflowopt", keep=keep, **options) as pruning:
        model(**batch)
    vlm, side, patch = model.model, 8, 4
    features = vlm.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
    with torch.no_grad():
        attention = _eager_attention(vlm.vision_tower, batch["pixel_values"], layer=1)  # hidden_states[-2]
    references = []
    for view, sinks in enumerate(_sink_rows(attention, threshold)):
        pixels = batch["pixel_values"][view]
        entropy = torch.tensor(
            [_entropy(pixels[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]) for r in range(side) for c in range(side)]
        )  # fmt: skip
        imp = (sinks[1:] + alpha * torch.softmax(entropy, 0)).tolist()
        cells = [(math.floor(i // side / cell), math.floor(i % side / cell)) for i in range(side * side)]
        budgets = _budgets(side * side, keep, ratios)
        kept, merged = _tower_stage(imp, [True] * 64, cells, features[view], budgets[0], cell, recycle=True)
        references.append((imp, [True] * 64, kept, merged, budgets))
    _check(pruning, references, ratios)
    # the entropy term changes the selection here (it is not a no-op)
    with vtprune.wrap(model, "vflowopt", keep=keep, **{**options, "alpha": 0.0}) as plain:
        model(**batch)
    assert any(
        set(a.tolist()) != set(b.tolist())
        for a, b in zip(plain.last.stages[0].kept_per_item, pruning.last.stages[0].kept_per_item)
    )


# -- every family --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [f for f in FAMILIES if f in APPLIES])
def test_keep_all_equals_dense(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, "vflowopt", keep=1.0, cell=2.0):
        assert_close(model(**batch).logits, dense)


def test_runs_where_the_tower_attention_is_mapped_and_refuses_elsewhere():
    for family in FAMILIES:
        model = tiny_model(family)
        batch = make_batch(model, samples_for(family)[:2])
        if family not in APPLIES:
            with pytest.raises(ValueError, match="vflowopt ranks tokens by the attention the vision tower's sink"):
                vtprune.wrap(model, "vflowopt", keep=0.25)
            continue
        with vtprune.wrap(model, "vflowopt", keep=0.25, cell=3.0) as pruning:
            model(**batch)
            stages = pruning.last.stages
            assert [s.layer for s in stages] == [None, 1, 3]
            assert stages[0].merges, family  # images recycle
            assert all(len(k) for k in stages[-1].kept_per_item)
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_a_shrunk_any_res_grid_raises_a_clear_error():
    """LLaVA-OneVision shrinks a grid of more than about 11 views' worth of patches by interpolation (anyres_max_9):
    its tokens blend patches, so there is no per-token tower signal (the authors interpolate their map instead)."""
    model = tiny_model("llava_onevision")
    model.config.image_grid_pinpoints = [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]
    batch = make_batch(model, [[3, Image((192, 192)), 4]])  # 36 crops: 48 x 48 patches shrunk to 24 x 24
    message = "vflowopt needs the vision tower's signals per token, which LLaVA-OneVision cannot align with this image"
    with vtprune.wrap(model, "vflowopt", keep=0.25), pytest.raises(ValueError, match=message):
        model(**batch)
