"""gather_tokens / compact_kv: pick rows of a token sequence per sample.

``gather_tokens(x [B, N, D], index [B, K]) -> [B, K, D]`` gathers kept hidden states, position ids or cos/sin
tables (index -1 = padding: a zero row, so ragged per-sample K can share one padded tensor).
``compact_kv(cache [B, H, N, d], index [B, K]) -> [B, H, K, d]`` compacts a KV-cache layer to the kept rows.

One Triton kernel serves both: programs over (batch x heads, row blocks, feature blocks), each loading a block of
indices once and copying ``BLOCK_K x BLOCK_D`` tiles, so the op moves exactly its output's bytes plus the indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtprune.kernels._triton import block_size, jit, use_triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit
def _gather_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows(
        x_ptr, index_ptr, out_ptr,
        rows, count, features, heads,
        stride_xb, stride_xn, stride_xd,
        stride_ib, stride_ik,
        stride_ob, stride_ok, stride_od,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(0)  # batch x heads
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        k_in = ks < count
        d_in = ds < features
        sample = batch // heads
        source = tl.load(index_ptr + sample * stride_ib + ks * stride_ik, mask=k_in, other=-1).to(tl.int64)
        found = k_in & (source >= 0)
        values = tl.load(
            x_ptr + batch.to(tl.int64) * stride_xb + source[:, None] * stride_xn + ds[None, :] * stride_xd,
            mask=found[:, None] & d_in[None, :],
            other=0.0,
        )
        tl.store(
            out_ptr + batch.to(tl.int64) * stride_ob + ks[:, None].to(tl.int64) * stride_ok + ds[None, :] * stride_od,
            values,
            mask=k_in[:, None] & d_in[None, :],
        )

    return gather_rows


def _launch(x: Tensor, index: Tensor, heads: int) -> Tensor:
    """x [batch * heads, N, D], index [batch, K] -> [batch * heads, K, D]."""
    rows, count, features = x.shape[1], index.shape[1], x.shape[2]
    out = x.new_empty(x.shape[0], count, features)
    if out.numel() == 0:
        return out
    block_k = block_size(count, maximum=64)
    block_d = block_size(features, maximum=256)
    grid = (x.shape[0], -(-count // block_k), -(-features // block_d))
    _gather_kernel()[grid](
        x, index, out, rows, count, features, heads,
        *x.stride(), *index.stride(), *out.stride(),
        BLOCK_K=block_k, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def gather_tokens_reference(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]``, zero where ``index[b, k] == -1``."""
    pad = index < 0
    out = x.gather(1, index.clamp(min=0).long()[..., None].expand(-1, -1, x.shape[-1]))
    return out.masked_fill(pad[..., None], 0) if bool(pad.any()) else out


def compact_kv_reference(cache: Tensor, index: Tensor) -> Tensor:
    batch, heads, _, dim = cache.shape
    flat = cache.reshape(batch * heads, cache.shape[2], dim)
    return gather_tokens_reference(flat, index.repeat_interleave(heads, dim=0)).view(batch, heads, -1, dim)


def check_index(name: str, x: Tensor, index: Tensor, rows: int, check_range: bool, floats_only: bool = True) -> None:
    """Clear errors for bad inputs, raised before any kernel launches."""
    if floats_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: values must be float32, float16 or bfloat16, got {x.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: index must be int32 or int64, got {index.dtype}")
    if index.ndim != 2:
        raise ValueError(f"{name}: index must be [B, K], got shape {tuple(index.shape)}")
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: index has batch {index.shape[0]} but the values have batch {x.shape[0]}")
    if index.device != x.device:
        raise ValueError(f"{name}: index is on {index.device} but the values are on {x.device}")
    if check_range and index.numel() and (int(index.min()) < -1 or int(index.max()) >= rows):
        raise IndexError(
            f"{name}: index values must lie in [0, {rows}) (or -1 for padding), got [{int(index.min())}, "
            f"{int(index.max())}]"
        )


def gather_tokens(x: Tensor, index: Tensor, *, backend: str = "auto", check: bool = True) -> Tensor:
    """Rows ``index [B, K]`` of each sample of ``x [B, N, D]`` (-1 = padding row of zeros), any D, fp32/fp16/bf16.

    Integer tensors (position ids) take the torch path. ``check=False`` skips the index-range check, which
    synchronises with the GPU, for callers whose indices are valid by construction.
    """
    if x.ndim != 3:
        raise ValueError(f"gather_tokens: x must be [B, N, D], got shape {tuple(x.shape)}")
    floating = x.is_floating_point()
    check_index("gather_tokens", x, index, x.shape[1], check, floats_only=floating)
    if not floating:
        return gather_tokens_reference(x, index)
    if use_triton(x, backend):
        return _launch(x, index, heads=1)
    return gather_tokens_reference(x, index)


def compact_kv(cache: Tensor, index: Tensor, *, backend: str = "auto", check: bool = True) -> Tensor:
    """The rows ``index [B, K]`` of a KV-cache layer ``[B, H, N, d]`` -> ``[B, H, K, d]`` (same rows for every head)."""
    if cache.ndim != 4:
        raise ValueError(f"compact_kv: cache must be [B, H, N, d], got shape {tuple(cache.shape)}")
    check_index("compact_kv", cache, index, cache.shape[2], check)
    if use_triton(cache, backend):
        batch, heads, rows, dim = cache.shape
        out = _launch(cache.reshape(batch * heads, rows, dim), index, heads=heads)
        return out.view(batch, heads, index.shape[1], dim)
    return compact_kv_reference(cache, index)
