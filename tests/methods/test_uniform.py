"""Uniform: lattice and evenly spaced picks, per grid part, on LLaVA-NeXT's views and newlines."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import Image, make_batch, newline_tokens, tiny_model
from tests.methods.common import _context
from vtprune.core.layout import GridPart
from vtprune.core.registry import Stage
from vtprune.methods.uniform import evenly_spaced, lattice


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
