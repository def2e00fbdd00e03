"""gather_tokens: pick rows of a token sequence per sample (kept hidden states, positions, rotary tables)."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens_reference(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]`` for ``x [B, N, D]`` and ``index [B, K]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Dispatcher for :func:`gather_tokens_reference`; every caller in the package goes through here."""
    if x.ndim != 3 or index.ndim != 2:
        raise ValueError(f"gather_tokens expects x [B, N, D] and index [B, K], got {tuple(x.shape)} and {tuple(index.shape)}")
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: batch of index ({index.shape[0]}) differs from batch of x ({x.shape[0]})")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"gather_tokens: index must be int32 or int64, got {index.dtype}")
    return gather_tokens_reference(x, index.long())
