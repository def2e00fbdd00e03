"""Each method's defining behaviour on hand-made inputs, and against a reference written from its spec."""

from __future__ import annotations

import json

import pytest
import torch

import vtprune
from tests.helpers import (
    CONFIGS,
    FAMILIES,
    Image,
    inapplicable,
    make_batch,
    newline_tokens,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from vtprune.core.budget import split_budget
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import GridPart, Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage
from vtprune.methods.uniform import evenly_spaced, lattice

INFO = ModelInfo(family="llava", num_layers=4, has_cls_token=True, mrope=False)


def _context(item_tokens: list[int], budgets: list[int], stage: Stage, attention: torch.Tensor | None = None, grids=()):
    """A context with one sample whose items sit back to back from slot 0."""
    items, views, start = [], [], 0
    total = sum(item_tokens)
    for index, (count, budget) in enumerate(zip(item_tokens, budgets)):
        item = VisualItem(index, 0, "image", count, start, grids)
        slots = torch.arange(start, start + count)
        views.append(ItemView(item, index, torch.arange(count), slots, torch.ones(count, dtype=torch.bool), budget))
        items.append(item)
        start += count
    layout = Layout(
        token=torch.arange(total)[None],
        valid=torch.ones(1, total, dtype=torch.bool),
        item=torch.cat([torch.full((c,), i) for i, c in enumerate(item_tokens)])[None],
        item_token=torch.cat([torch.arange(c) for c in item_tokens])[None],
        positions=torch.arange(total)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )
    ctx = PruneContext(stage=stage, model=INFO, layout=layout, items=views)
    if attention is not None:
        ctx.signals = Signals(attention=lambda: attention[None])
    return ctx


def test_fastv_keeps_the_tokens_the_last_token_attends_to_most():
    attention = torch.tensor([0.01, 0.30, 0.02, 0.25, 0.05, 0.20, 0.07, 0.10])
    ctx = _context([4, 4], [2, 1], Stage(layer=2, attention_from=1), attention)
    chosen = vtprune.FastV().select(ctx)
    assert sorted(chosen[0].tolist()) == [1, 3]  # 0.30 and 0.25 in the first image
    assert chosen[1].tolist() == [1]  # 0.20 is the highest of the second image


def test_fastv_prunes_at_layer_k_with_attention_of_layer_k_minus_1():
    stages = vtprune.FastV(layer=3).stages(INFO, 64)
    assert stages == [Stage(layer=3, attention_from=2, query="last")]


def test_fastv_matches_a_reference_built_from_eager_attention_maps():
    """Reference from the spec: eager attention of layer K-1, head mean, last token's row, top-k per image."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    keep, layer = 5, 2
    attention = model(**batch, output_attentions=True).attentions[layer - 1].mean(1)
    with vtprune.wrap(model, "fastv", keep=keep, layer=layer) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    for sample in range(2):
        row = attention[sample, -1][visual[sample]]  # left padding: the last token is the last slot
        per_image = row.split(64)
        expected = torch.cat([img.topk(keep).indices.sort().values + 64 * i for i, img in enumerate(per_image)])
        assert torch.equal(pruning.kept[0][sample], expected)


def test_random_is_seeded_per_image_and_differs_between_images():
    ctx = _context([16, 16], [4, 4], Stage(layer=None))
    first = vtprune.Random(seed=0).select(ctx)
    again = vtprune.Random(seed=0).select(ctx)
    other = vtprune.Random(seed=1).select(ctx)
    assert all(torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, again))
    assert not torch.equal(first[0].sort().values, first[1].sort().values)
    assert any(not torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, other))


def test_random_covers_all_tokens_uniformly_without_a_seed():
    ctx = _context([10], [3], Stage(layer=None))
    counts = torch.zeros(10)
    torch.manual_seed(0)
    for _ in range(3000):
        counts[vtprune.Random(seed=None).select(ctx)[0]] += 1
    assert counts.sum() == 9000
    assert (counts / 3000 - 0.3).abs().max() < 0.05


def test_lattice_keeps_every_other_row_and_column_for_a_quarter():
    chosen = lattice(8, 8, 16)
    rows, cols = chosen // 8, chosen % 8
    assert sorted(set(rows.tolist())) == [1, 3, 5, 7] and sorted(set(cols.tolist())) == [1, 3, 5, 7]
    assert lattice(24, 24, 144).numel() == 144
    assert set((lattice(24, 24, 144) // 24).tolist()) == set(range(1, 24, 2))


def test_lattice_exact_counts_and_distinct():
    for height, width in [(3, 7), (8, 8), (5, 1), (24, 24)]:
        for count in range(1, height * width + 1):
            chosen = lattice(height, width, count)
            assert chosen.numel() == count == chosen.unique().numel()
            assert int(chosen.max()) < height * width


def test_lattice_on_a_single_central_token():
    assert lattice(5, 5, 1).tolist() == [12]


def test_split_budget_proportional_and_exact():
    assert split_budget(10, [576, 0 + 576]) == [5, 5]
    assert split_budget(7, [100, 300]) == [2, 5]
    assert sum(split_budget(13, [3, 50, 9])) == 13
    assert split_budget(5, [2, 100]) == [0, 5]
    assert split_budget(9, [2, 3]) == [2, 3]  # never more than a part holds


def test_evenly_spaced_spans_the_range():
    assert evenly_spaced(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert evenly_spaced(4, 4).tolist() == [0, 1, 2, 3]


def test_uniform_uses_the_grid_of_each_part():
    grids = (GridPart(0, 4, 4, 4), GridPart(16, 2, 4, 5))  # second grid has a separator column, as LLaVA-NeXT
    item_tokens = 16 + 2 * 5
    ctx = _context([item_tokens], [6], Stage(layer=None), grids=grids)
    chosen = vtprune.Uniform().select(ctx)[0]
    assert chosen.numel() == 6
    in_base = chosen[chosen < 16]
    in_high = chosen[chosen >= 16]
    assert in_base.numel() == 4 and in_high.numel() == 2  # 16 : 8 patch tokens -> 4 : 2
    assert sorted(in_base.tolist()) == [5, 7, 13, 15]  # rows 1,3 x cols 1,3
    assert all((int(t) - 16) % 5 != 4 for t in in_high)  # never a separator column


def test_uniform_on_llava_next_keeps_newlines_and_spreads_over_both_views():
    model = tiny_model("llava_next")
    image = Image((32, 48))  # 8 x 8 base view + an 8 x 12 unpadded high-resolution grid with 8 newlines
    batch = make_batch(model, [[2, image, 3]])
    with vtprune.wrap(model, "uniform", keep=8) as pruning:
        model(**batch)
    kept = pruning.last.stages[0].kept_per_item[0]
    newlines = torch.arange(8) * 13 + 12 + 64
    assert pruning.last.items[0]["num_tokens"] == 64 + 8 * 13 and newline_tokens(model, image) == 8
    assert torch.isin(newlines, kept).all()
    patches = kept[~torch.isin(kept, newlines)]
    assert patches.numel() == 8
    assert (patches < 64).sum() == 3 and (patches >= 64).sum() == 5  # 64 : 96 patch tokens


def test_method_configs_round_trip_through_json():
    configs = (
        vtprune.FastV(layer=3),
        vtprune.Random(seed=7, layer=1),
        vtprune.Uniform(positions="keep"),
        vtprune.TransPrune(prune_layers=(3, 5), ratios=(0.5, 0.25)),
        vtprune.MMTok(alpha=0.3),
    )
    for config in configs:
        data = json.loads(config.to_json())
        assert data["method"] == config.name
        assert vtprune.Method.from_dict(data) == config
    llm = [
        "divprune", "downsample", "entropyprune", "fastervlm", "fastv", "mmtok", "pdrop", "pool", "random", "sparsevlm", "transprune", "uniform",
        "visionzip", "vtc_cls",
    ]  # fmt: skip
    assert vtprune.list_methods("llm") == llm
    assert vtprune.list_methods("vit") == ["evit", "tome"]
    assert vtprune.list_methods("trained") == ["dtop"]
    assert vtprune.list_methods() == sorted([*llm, "evit", "tome", "dtop"])  # one registry, every kind
    assert vtprune.method_kind("tome") == "vit" and vtprune.method_kind("nope") is None
    with pytest.raises(ValueError, match=r"kind must be one of \['llm', 'trained', 'vit'\], got 'vlm'"):
        vtprune.list_methods("vlm")


def test_shared_configs_cover_every_llm_method():
    assert {method for method, _ in CONFIGS} == set(vtprune.list_methods("llm"))


def test_methods_refuse_exactly_the_families_they_cannot_serve():
    """The cross-cutting tests skip what a method refuses; this pins down what that is."""
    refused = {
        (method, family)
        for method, options in CONFIGS
        for family in FAMILIES
        if inapplicable(family, method, options)
    }
    qwen = ("qwen2_vl", "qwen2_5_vl")
    expected = {(m, f) for m, _ in CONFIGS for f in qwen if vtprune.method_class(m).needs_cls_token}
    expected |= {("downsample", f) for f in ("llava", "llava_next")}  # CLIP resizes every image to one size
    expected |= {("pool", f) for f in qwen}  # where="before" needs a per-token projector; Qwen's merger is 2x2
    assert refused == expected
    assert "no [CLS] token" in inapplicable("qwen2_vl", "vtc_cls", {})
    assert inapplicable("qwen2_vl", "pool", {}) is None  # only where="before" is refused
