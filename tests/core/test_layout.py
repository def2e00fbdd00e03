"""Layouts on hand-made tensors: compaction (padding sides, renumbering, three-axis positions), padding side."""

from __future__ import annotations

import pytest
import torch

from vtprune.core.layout import Layout, padding_side_of


def _layout(valid: list[list[int]], item: list[list[int]]) -> Layout:
    valid_t = torch.tensor(valid, dtype=torch.bool)
    length = valid_t.shape[1]
    positions = (valid_t.long().cumsum(1) - 1).clamp(min=0)
    item_t = torch.tensor(item)
    return Layout(
        token=torch.arange(length).expand_as(valid_t),
        valid=valid_t,
        item=item_t,
        item_token=torch.where(item_t >= 0, (item_t >= 0).long().cumsum(1) - 1, -1),
        positions=positions,
        shift=torch.zeros(valid_t.shape[0], dtype=torch.long),
        first_layer=0,
        padding_side=padding_side_of(valid_t.long()),
    )


def test_compact_left_padding_renumbered():
    layout = _layout(
        [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
        [[-1, -1, 0, 0, 0, -1], [-1, 1, 1, 1, 1, -1]],
    )
    keep = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    out = layout.compact(keep, renumber=True, first_layer=2)
    assert out.padding_side == "left" and out.first_layer == 2
    assert out.token.tolist() == [[-1, 1, 2, 5], [0, 2, 3, 5]]
    assert out.valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert out.positions[0, 1:].tolist() == [0, 1, 2]  # gaps closed
    assert out.positions[1].tolist() == [0, 1, 2, 3]
    assert out.shift.tolist() == [2, 2]
    assert out.item_token.tolist() == [[-1, -1, 0, -1], [-1, 1, 2, -1]]


def test_compact_right_padding_keeps_positions():
    layout = _layout([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], [[-1, 0, 0, -1, -1], [-1, 1, 1, 1, -1]])
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    out = layout.compact(keep, renumber=False, first_layer=0)
    assert out.padding_side == "right"
    assert out.token.tolist() == [[0, 2, 3], [0, 1, 4]]
    assert out.positions.tolist() == [[0, 2, 3], [0, 1, 4]]
    assert out.shift.tolist() == [0, 0]


def test_compact_three_axis_positions():
    layout = _layout([[1, 1, 1, 1]], [[-1, 0, 0, -1]])
    layout.positions = torch.arange(12).view(3, 1, 4)
    out = layout.compact(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool), renumber=False, first_layer=0)
    assert out.positions.tolist() == [[[0, 2, 3]], [[4, 6, 7]], [[8, 10, 11]]]


@pytest.mark.parametrize("mask,side", [([[1, 1], [0, 1]], "left"), ([[1, 1], [1, 0]], "right"), (None, "left")])
def test_padding_side(mask, side):
    assert padding_side_of(torch.tensor(mask) if mask is not None else None) == side
