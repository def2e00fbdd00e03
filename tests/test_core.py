"""Core pieces on hand-made tensors: budgets, layout compaction, recomputed attention rows."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vtprune.core.attention import attention_rows, gather_rows
from vtprune.core.budget import tokens_to_keep, validate_keep
from vtprune.core.layout import Layout, padding_side_of


def test_tokens_to_keep():
    assert tokens_to_keep(64, 576) == 64
    assert tokens_to_keep(1000, 576) == 576
    assert tokens_to_keep(0.25, 576) == 144
    assert tokens_to_keep(0.1, 576) == 58  # FasterVLM: 90 % reduction -> 58
    assert tokens_to_keep(0.05, 576) == 29
    assert tokens_to_keep(0.001, 576) == 1  # a fraction never drops an image entirely
    assert tokens_to_keep(1.0, 7) == 7
    assert tokens_to_keep(5, 0) == 0
    assert validate_keep(3) == 3 and validate_keep(0.5) == 0.5


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


class _Attention(torch.nn.Module):
    head_dim = 4
    scaling = 0.5


def test_attention_rows_match_a_full_softmax_with_gqa_and_padding():
    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 2, 6, 4, 2, 4
    q = torch.randn(batch, length, heads * dim)
    k = torch.randn(batch, length, kv_heads * dim)
    cos, sin = torch.randn(batch, length, dim), torch.randn(batch, length, dim)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    query_slots = torch.tensor([[5], [3]])
    got = attention_rows(_Attention(), gather_rows(q, query_slots), k, (cos, sin), query_slots, valid)

    def rope(x):  # x [B, heads, L, d]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    qh = rope(q.view(batch, length, heads, dim).transpose(1, 2))
    kh = rope(k.view(batch, length, kv_heads, dim).transpose(1, 2)).repeat_interleave(2, dim=1)
    scores = qh @ kh.transpose(-1, -2) * 0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~(causal[None, None] & valid[:, None, None, :]), float("-inf"))
    full = scores.softmax(-1)
    expected = torch.stack([full[0, :, 5], full[1, :, 3]])[:, :, None]
    assert_close(got, expected)
    assert got[0, :, 0, 0].abs().max() == 0  # padding key
    assert got[1, :, 0, 4:].abs().max() == 0  # causal


@pytest.mark.parametrize("mask,side", [([[1, 1], [0, 1]], "left"), ([[1, 1], [1, 0]], "right"), (None, "left")])
def test_padding_side(mask, side):
    assert padding_side_of(torch.tensor(mask) if mask is not None else None) == side
