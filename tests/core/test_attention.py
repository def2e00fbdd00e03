"""Attention rows recomputed from a layer's Q/K (GQA, padding, causality, partial rotary, gated queries), on
hand-made tensors."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.testing import assert_close

from vtprune.core.attention import (
    apply_rotary,
    attention_rows,
    gather_rows,
    rotate_half,
    split_query,
)


def test_partial_rotary_rotates_the_first_dims_and_passes_the_rest():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)  # [B, heads, T, head_dim]
    cos, sin = torch.randn(2, 5, 4), torch.randn(2, 5, 4)  # rotary over half the head (GLM-4V's 0.5)
    out = apply_rotary(x, cos, sin)
    rotated = x[..., :4] * cos[:, None] + rotate_half(x[..., :4]) * sin[:, None]
    assert_close(out[..., :4], rotated)
    assert torch.equal(out[..., 4:], x[..., 4:])
    full = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert_close(apply_rotary(x, *full), x * full[0][:, None] + rotate_half(x) * full[1][:, None])


def test_gated_query_projection_scores_only_its_query_half():
    torch.manual_seed(0)
    batch, length, heads, head_dim = 2, 6, 2, 4
    attn = SimpleNamespace(head_dim=head_dim, scaling=head_dim**-0.5)
    query = torch.randn(batch, length, heads, head_dim)
    gate = torch.randn(batch, length, heads, head_dim) * 100  # would dominate the scores if it leaked in
    gated = torch.cat([query, gate], dim=-1).flatten(2)  # [query | gate] per head, as q_proj emits it
    assert torch.equal(split_query(gated, head_dim, gated=True), query)
    keys = torch.randn(batch, length, heads * head_dim)
    rotary = torch.ones(batch, length, head_dim), torch.zeros(batch, length, head_dim)
    slots = torch.tensor([[5, 3], [5, 4]])
    valid = torch.ones(batch, length, dtype=torch.bool)
    plain = attention_rows(attn, query.flatten(2).gather(1, slots[..., None].expand(-1, -1, heads * head_dim)),
                           keys, rotary, slots, valid)  # fmt: skip
    rows = gated.gather(1, slots[..., None].expand(-1, -1, 2 * heads * head_dim))
    assert_close(attention_rows(attn, rows, keys, rotary, slots, valid, gated_query=True), plain)


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


def test_interleaved_partial_rotary_matches_glm4v():
    """GLM-4V rotates adjacent pairs over the first half of each head; ours gives the same bits as its code."""
    from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rotary(q, cos, sin, interleaved=True), expected_q)
    assert torch.equal(apply_rotary(k, cos, sin, interleaved=True), expected_k)
    assert not torch.allclose(apply_rotary(q, cos, sin), expected_q)  # the halves convention differs


def test_row_attention_keeps_heads_and_rows_apart_and_averages_to_mean_attention():
    from vtprune.core.signals import mean_attention, row_attention

    torch.manual_seed(0)
    batch, length, heads, dim = 2, 6, 4, 4
    q, k = torch.randn(batch, length, heads * dim), torch.randn(batch, length, 2 * dim)
    rotary = torch.randn(batch, length, dim), torch.randn(batch, length, dim)
    parts = SimpleNamespace(attention=_Attention(), gated_query=False, interleaved_rotary=False)
    valid = torch.ones(batch, length, dtype=torch.bool)
    layout = SimpleNamespace(batch_size=batch, length=length, valid=valid, blocks=None)
    rows, real = torch.tensor([[4, 5], [3, 0]]), torch.tensor([[True, True], [True, False]])

    def queries(slots):
        return gather_rows(q, slots)

    per_head = row_attention(parts, queries, k, rotary, layout, rows, real, per_head=True)
    assert per_head.shape == (batch, heads, 2, length)
    first = tuple(table[:1] for table in rotary)
    alone = attention_rows(_Attention(), gather_rows(q[:1], rows[:1]), k[:1], first, rows[:1], valid[:1])
    assert_close(per_head[0], alone[0])
    assert per_head[1, :, 1].abs().max() == 0  # a row that is not real
    averaged = row_attention(parts, queries, k, rotary, layout, rows, real)
    assert_close(averaged, per_head.mean(1))
    mean = mean_attention(parts, queries, k, rotary, layout, (rows, real))
    assert_close(averaged.sum(1) / real.sum(1, keepdim=True), mean)
