"""Signals methods score with, computed from what the engine's hooks captured.

Kept apart from the engine so each can be tested on hand-made tensors: query rows of a layout, attention rows
averaged over them, query states after RoPE, and the vision tower's [CLS] rows aligned with each image's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtprune.core.adapter import DecoderParts
from vtprune.core.attention import (
    apply_rotary,
    attention_rows,
    normed_keys,
    normed_queries,
)
from vtprune.core.layout import Layout

# Query rows are processed in chunks so that "all" never materialises an L x L map per head.
_QUERY_CHUNK = 128
# The key of a Stage.pixel_maps function's values among an image's tower signals: (PIXELS, fn).
PIXELS = "pixels"
# A tower's received attention holds at most this many probabilities at once (64 MiB in fp32).
_TOWER_CHUNK_ELEMENTS = 1 << 24


def query_slots(layout: Layout, query: str) -> tuple[Tensor, Tensor]:
    """Slots whose attention rows a stage averages, ``[B, R]``, and which of them are real, ``[B, R]``.

    ``last``: each sample's last real token. ``instruction``: the real text tokens after the sample's last visual
    token (its instruction and the answer template; none for text-only samples). ``all``: every real token.
    """
    valid = layout.valid
    slots = torch.arange(layout.length, device=valid.device).expand_as(valid)
    if query == "last":
        return torch.where(valid, slots, -1).max(1).values[:, None], torch.ones_like(valid[:, :1])
    if query == "instruction":
        last_visual = torch.where(layout.visual, slots, -1).max(1).values
        chosen = valid & (slots > last_visual[:, None]) & (last_visual[:, None] >= 0)
    elif query == "all":
        chosen = valid
    else:
        raise ValueError(f"unknown attention query {query!r}")
    counts = chosen.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    row_valid = torch.arange(width, device=valid.device)[None] < counts[:, None]
    return order, row_valid


def mean_attention(
    parts: DecoderParts,
    queries: Callable[[Tensor], Tensor],
    key_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    layout: Layout,
    query: str | tuple[Tensor, Tensor],
) -> Tensor:
    """Head- and row-averaged attention of the query rows to every slot, ``[B, L]`` (fp32), in the decoder layer
    described by ``parts`` (its attention module and how its queries and RoPE are laid out).

    ``query`` names the rows (see :func:`query_slots`) or gives them as ``(slots [B, R], real [B, R])``.
    ``queries(slots)`` returns the layer's ``q_proj`` output at ``slots``, so only those rows are projected.
    """
    rows, row_valid = query_slots(layout, query) if isinstance(query, str) else query
    total = torch.zeros(layout.batch_size, layout.length, dtype=torch.float32, device=rows.device)
    for chunk, probs in _row_chunks(parts, queries, key_states, position_embeddings, layout, rows):
        weights = row_valid[:, chunk].float()
        total += (probs.mean(1) * weights[..., None]).sum(1)
    return total / row_valid.sum(1).clamp(min=1)[:, None]


def row_attention(
    parts: DecoderParts,
    queries: Callable[[Tensor], Tensor],
    key_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    layout: Layout,
    rows: Tensor,
    row_valid: Tensor,
    per_head: bool = False,
) -> Tensor:
    """Like :func:`mean_attention` for the query rows ``rows [B, R]``, each row kept apart: ``[B, R, L]`` (fp32,
    head-averaged), or with ``per_head`` each head apart too, ``[B, heads, R, L]`` (AdaptInfer weights heads
    itself); zeros for rows ``row_valid`` marks as not real."""
    out: Tensor | None = None
    for chunk, probs in _row_chunks(parts, queries, key_states, position_embeddings, layout, rows):
        probs = probs if per_head else probs.mean(1, keepdim=True)
        if out is None:
            out = torch.zeros(*probs.shape[:2], rows.shape[1], layout.length, dtype=torch.float32, device=rows.device)
        out[:, :, chunk] = probs * row_valid[:, None, chunk, None].float()
    if out is None:  # no rows at all
        out = torch.zeros(layout.batch_size, 1, 0, layout.length, dtype=torch.float32, device=rows.device)
    return out if per_head else out[:, 0]


def _row_chunks(
    parts: DecoderParts,
    queries: Callable[[Tensor], Tensor],
    key_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    layout: Layout,
    rows: Tensor,
) -> Iterator[tuple[slice, Tensor]]:
    """Attention of chunks of the query rows, ``(chunk, [B, heads, chunk rows, L])``."""
    for start in range(0, rows.shape[1], _QUERY_CHUNK):
        chunk = slice(start, start + _QUERY_CHUNK)
        slots = rows[:, chunk]
        probs = attention_rows(
            parts.attention, queries(slots), key_states, position_embeddings, slots, layout.valid, parts.gated_query,
            parts.interleaved_rotary, layout.blocks,
        )  # fmt: skip
        yield chunk, probs


def rotated_queries(parts: DecoderParts, query_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """The query states of the decoder layer described by ``parts`` after its q-norm (if any) and RoPE,
    ``[B, L, heads, head_dim]``."""
    q = normed_queries(parts.attention, query_states, parts.gated_query)
    cos, sin = position_embeddings
    return apply_rotary(q.transpose(1, 2), cos, sin, parts.interleaved_rotary).transpose(1, 2)


def rotated_keys(parts: DecoderParts, key_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """The key states of the decoder layer described by ``parts`` after its k-norm (if any) and RoPE,
    ``[B, L, kv_heads, head_dim]``: what its KV cache holds."""
    k = normed_keys(parts.attention, key_states)
    cos, sin = position_embeddings
    return apply_rotary(k.transpose(1, 2), cos, sin, parts.interleaved_rotary).transpose(1, 2)


def vit_cls_rows(query_states: Tensor, key_states: Tensor, num_heads: int, scale: float) -> Tensor:
    """Head-averaged attention of token 0 ([CLS]) to every token of a ViT layer, ``[views, T]`` (no mask)."""
    views, tokens, _ = key_states.shape
    q = query_states[:, :1].reshape(views, 1, num_heads, -1).transpose(1, 2).float()
    k = key_states.reshape(views, tokens, num_heads, -1).transpose(1, 2).float()
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [views, heads, 1, T]
    return probs.mean(1)[:, 0]


def vit_received(queries: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Head-averaged attention each of ``T`` tokens receives, averaged over all ``T`` query tokens, ``[T]`` (fp32),
    from the queries and keys ``[heads, T, head_dim]`` of tokens that attend to each other in full (no mask). Query
    rows go in chunks, so a large image's ``T x T`` map is never held whole."""
    heads, tokens, _ = keys.shape
    k = keys.float().transpose(1, 2)
    total = torch.zeros(tokens, dtype=torch.float32, device=keys.device)
    step = max(1, _TOWER_CHUNK_ELEMENTS // (heads * tokens))
    for start in range(0, tokens, step):
        total += torch.softmax(queries[:, start : start + step].float() @ k * scale, dim=-1).sum((0, 1))
    return total / (heads * tokens)


@dataclass
class ImageSignals:
    """Vision-tower signals of one image, aligned with its tokens as the LLM receives them.

    ``source[t]`` is the flat index ``view * T + position`` of token t in the tower's output (``T`` tokens per view,
    -1 for tokens no view produced, such as LLaVA-NeXT's newlines).
    """

    source: Tensor
    tokens_per_view: int
    cls_attention: dict[int, Tensor]
    encoder_features: Tensor | None = None
    # head-averaged keys of tower layers per token, and each view's [CLS] feature (encoder space)
    keys: dict[int, Tensor] = field(default_factory=dict)
    view_cls: dict[int, Tensor] = field(default_factory=dict)
    # per tower layer, the attention each token receives (mean over heads and over its view's query tokens); per
    # (layer, fn) of Stage.vision_maps and (PIXELS, fn) of Stage.pixel_maps, the values those gave each token
    received: dict[Any, Tensor] = field(default_factory=dict)

    @property
    def view(self) -> Tensor:
        return torch.where(self.source >= 0, self.source // self.tokens_per_view, -1)

    @staticmethod
    def cat(parts: list[ImageSignals]) -> ImageSignals:
        """The signals of several encoder rows regrouped into one image (tiles of one call, same tokens per view)."""
        first = parts[0]

        def joined(values: list[dict[int, Tensor]]) -> dict[int, Tensor]:
            return {layer: torch.cat([v[layer] for v in values]) for layer in values[0]}

        features = [p.encoder_features for p in parts]
        return ImageSignals(
            torch.cat([p.source for p in parts]),
            first.tokens_per_view,
            joined([p.cls_attention for p in parts]),
            torch.cat(features) if all(f is not None for f in features) else None,
            joined([p.keys for p in parts]),
            {view: cls for p in parts for view, cls in p.view_cls.items()},
            joined([p.received for p in parts]),
        )

    def rows(self, start: int, count: int) -> ImageSignals:
        """The signals of tokens ``[start, start + count)`` (one item of a multi-item chunk)."""
        span = slice(start, start + count)
        return ImageSignals(
            self.source[span],
            self.tokens_per_view,
            {layer: values[span] for layer, values in self.cls_attention.items()},
            self.encoder_features[span] if self.encoder_features is not None else None,
            {layer: values[span] for layer, values in self.keys.items()},
            self.view_cls,
            {layer: values[span] for layer, values in self.received.items()},
        )


def align_image_signals(
    sources: list[Tensor],
    tokens_per_view: int,
    cls_rows: dict[int, Tensor],
    encoder_states: Tensor | None,
    keys: dict[int, Tensor] | None = None,
    cls_position: int | None = None,
    received: dict[int, Tensor] | None = None,
) -> list[ImageSignals]:
    """Per image: pick each token's [CLS] attention, encoder feature, keys and received attention (``[views, T]``
    per layer) from the tower outputs by its source; with ``cls_position``, also each of its views' [CLS] feature."""
    signals = []
    for source in sources:
        found = source >= 0
        flat = source.clamp(min=0)

        def pick(values: Tensor) -> Tensor:  # [views, T, ...] -> [n, ...], zero where no view produced the token
            picked = values.flatten(0, 1)[flat.to(values.device)]
            # sources live on the CPU; the tower's signals on the model's device (a CUDA * CPU product fails)
            return picked * found.to(picked.device, picked.dtype).view(-1, *[1] * (picked.ndim - 1))

        cls = {layer: pick(rows) for layer, rows in cls_rows.items()}
        features = pick(encoder_states) if encoder_states is not None else None
        token_keys = {layer: pick(values) for layer, values in (keys or {}).items()}
        token_received = {layer: pick(values) for layer, values in (received or {}).items()}
        view_cls = {}
        if encoder_states is not None and cls_position is not None:
            for view in torch.unique(source[found] // tokens_per_view).tolist():
                view_cls[view] = encoder_states[view, cls_position]
        signals.append(ImageSignals(source, tokens_per_view, cls, features, token_keys, view_cls, token_received))
    return signals
