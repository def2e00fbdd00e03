"""Attention rows recomputed from a layer's queries and keys.

Methods that rank tokens by attention (FastV, PyramidDrop, SparseVLM, ...) need only a few rows of one layer's
attention map. Recomputing ``softmax(q_rows k^T / sqrt(d))`` for those rows costs O(rows x L x d) and lets the
model itself run with SDPA or FlashAttention, which never materialise the map.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gather_rows(values: Tensor, slots: Tensor) -> Tensor:
    """``values[b, slots[b, r]]`` for ``values [B, L, D]`` and ``slots [B, R]``."""
    return values.gather(1, slots[..., None].expand(-1, -1, values.shape[-1]))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """GLM-4V's ``rotate_half_llm``: pairs are adjacent dims ``(2i, 2i + 1)``, not the two halves."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """RoPE on ``x [B, heads, T, d]`` with ``cos``/``sin`` of shape ``[B, T, r]``: HF's rotate-half convention, or
    with ``interleaved`` adjacent pairs (GLM-4V, whose tables repeat each frequency twice in a row). Partial rotary
    (``r < d``, e.g. GLM-4V's 0.5, Qwen3.5's 0.25): the first ``r`` dims rotate, the rest pass."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary], cos, sin, interleaved), x[..., rotary:]), dim=-1)
    # x * cos + rotate(x) * sin, with one full-size temporary instead of three (same arithmetic, same bits)
    cos, sin, half = cos.unsqueeze(1), sin.unsqueeze(1), x.shape[-1] // 2
    first, second = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, half), slice(half, None))
    out = x * cos
    out[..., first] -= x[..., second] * sin[..., first]
    out[..., second] += x[..., first] * sin[..., second]
    return out


def split_query(query_states: Tensor, head_dim: int, gated: bool = False) -> Tensor:
    """``[B, T, heads, head_dim]`` from a ``q_proj`` output; a gated projection (Qwen3.5's attention output gate)
    holds ``[query | gate]`` per head, and only the query half enters the scores."""
    batch, length, _ = query_states.shape
    if gated:
        return query_states.view(batch, length, -1, 2 * head_dim)[..., :head_dim]
    return query_states.view(batch, length, -1, head_dim)


def normed_queries(attn: nn.Module, query_states: Tensor, gated: bool = False) -> Tensor:
    """A layer's ``q_proj`` output as ``[B, T, heads, head_dim]`` after its q-norm (if any), before RoPE."""
    q = split_query(query_states, attn.head_dim, gated)
    return attn.q_norm(q) if getattr(attn, "q_norm", None) is not None else q


def normed_keys(attn: nn.Module, key_states: Tensor) -> Tensor:
    """A layer's ``k_proj`` output as ``[B, T, kv_heads, head_dim]`` after its k-norm (if any), before RoPE."""
    batch, length, _ = key_states.shape
    k = key_states.view(batch, length, -1, attn.head_dim)
    return attn.k_norm(k) if getattr(attn, "k_norm", None) is not None else k


def attention_rows(
    attn: nn.Module,
    query_rows: Tensor,
    key_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    query_slots: Tensor,
    key_valid: Tensor,
    gated_query: bool = False,
    interleaved_rotary: bool = False,
    blocks: Tensor | None = None,
) -> Tensor:
    """Attention probabilities of the query rows at ``query_slots`` of one decoder layer, ``[B, heads, R, L]`` (fp32).

    ``attn`` is the layer's attention module (for ``head_dim``, ``scaling`` and optional ``q_norm``/``k_norm``);
    ``query_rows`` its ``q_proj`` output for just those rows, ``[B, R, heads * head_dim]``, and ``key_states`` its
    ``k_proj`` output for every slot, ``[B, L, kv_heads * head_dim]``, both before RoPE; ``position_embeddings`` the
    ``(cos, sin)`` the layer received; ``gated_query``: ``q_proj`` also emits a gate per head (see
    :func:`split_query`); ``interleaved_rotary``: RoPE rotates adjacent pairs (see :func:`apply_rotary`). Keys are
    masked where ``key_valid`` is False (padding) and after the query's own slot, except within the query's
    bidirectional block (``blocks [B, L]``, -1 = none: Gemma 3's images, PaliGemma's prefix), exactly like the
    layer's own mask. Logits are soft-capped where the layer does (Gemma 2's ``attn_logit_softcapping``).
    """
    length = key_states.shape[1]
    cos, sin = position_embeddings
    q = normed_queries(attn, query_rows, gated_query).transpose(1, 2).float()
    k = normed_keys(attn, key_states).transpose(1, 2).float()

    cos, sin = cos.float(), sin.float()
    row_index = query_slots[..., None].expand(-1, -1, cos.shape[-1])
    q = apply_rotary(q, cos.gather(1, row_index), sin.gather(1, row_index), interleaved_rotary)
    k = apply_rotary(k, cos, sin, interleaved_rotary)
    if q.shape[1] != k.shape[1]:  # grouped KV heads (a repeat of 1 would still copy every key)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    key_slots = torch.arange(length, device=key_states.device)
    seen = key_slots[None, None, :] <= query_slots[..., None]
    if blocks is not None:
        query_blocks = blocks.gather(1, query_slots)[..., None]
        seen = seen | ((query_blocks >= 0) & (blocks[:, None, :] == query_blocks))
    allowed = key_valid[:, None, :] & seen
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    # a padding query sees no key: its row is all zeros rather than NaN (which would poison weighted means)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)
