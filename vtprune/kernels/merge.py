"""merge_tokens: the weighted mean of every token into its destination slot.

``merge_tokens(x [B, N, D], dst [B, N], weight [B, N], K) -> [B, K, D]`` with
``out[b, k] = sum_{n: dst[b, n] = k} weight[b, n] x[b, n] / sum_{n: dst[b, n] = k} weight[b, n]``; ``dst = -1`` leaves
a token out, a slot nobody merges into stays zero. Merging methods (VisionZip's contextual tokens, pooling, ToMe)
express themselves as destinations and weights.

The Triton kernel scatter-adds weighted rows into an fp32 accumulator with atomics (one program per tile of tokens x
features), then a division normalises; fp16/bf16 inputs accumulate in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtprune.kernels._triton import block_size, jit, use_triton
from vtprune.kernels.gather import FLOAT_DTYPES


@jit
def _merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scatter_weighted(
        x_ptr, dst_ptr, weight_ptr, acc_ptr, total_ptr,
        tokens, slots, features,
        stride_xb, stride_xn, stride_xd,
        stride_db, stride_dn,
        stride_wb, stride_wn,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(0)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        n_in = ns < tokens
        d_in = ds < features
        dst = tl.load(dst_ptr + batch * stride_db + ns * stride_dn, mask=n_in, other=-1).to(tl.int64)
        weight = tl.load(weight_ptr + batch * stride_wb + ns * stride_wn, mask=n_in, other=0.0).to(tl.float32)
        live = n_in & (dst >= 0) & (dst < slots)
        values = tl.load(
            x_ptr + batch.to(tl.int64) * stride_xb + ns[:, None].to(tl.int64) * stride_xn + ds[None, :] * stride_xd,
            mask=live[:, None] & d_in[None, :],
            other=0.0,
        ).to(tl.float32)
        base = batch.to(tl.int64) * slots
        tl.atomic_add(
            acc_ptr + (base + dst)[:, None] * features + ds[None, :],
            values * weight[:, None],
            mask=live[:, None] & d_in[None, :],
        )
        if tl.program_id(2) == 0:
            tl.atomic_add(total_ptr + base + dst, weight, mask=live)

    return scatter_weighted


def _normalise(acc: Tensor, total: Tensor, dtype: torch.dtype) -> Tensor:
    return (acc / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(dtype)


def merge_tokens_reference(x: Tensor, dst: Tensor, weight: Tensor, slots: int) -> Tensor:
    """The weighted mean per destination slot with ``scatter_add_`` (fp32 accumulation)."""
    batch, _, features = x.shape
    live = (dst >= 0) & (dst < slots)
    index = dst.clamp(0, max(slots - 1, 0)).long()
    weight = weight.float() * live
    acc = x.new_zeros(batch, slots, features, dtype=torch.float32)
    acc.scatter_add_(1, index[..., None].expand(-1, -1, features), x.float() * weight[..., None])
    total = x.new_zeros(batch, slots, dtype=torch.float32).scatter_add_(1, index, weight)
    return _normalise(acc, total, x.dtype)


def merge_tokens(
    x: Tensor, dst: Tensor, weight: Tensor | None, slots: int, *, backend: str = "auto", check: bool = True
) -> Tensor:
    """Weighted mean of the tokens of ``x [B, N, D]`` into ``slots`` destinations ``dst [B, N]`` (-1 = left out);
    ``weight [B, N]`` defaults to ones (a plain mean)."""
    if x.ndim != 3:
        raise ValueError(f"merge_tokens: x must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"merge_tokens: x must be float32, float16 or bfloat16, got {x.dtype}")
    if dst.shape != x.shape[:2] or dst.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"merge_tokens: dst must be an integer [B, N] = {tuple(x.shape[:2])}, got {dst.dtype} {tuple(dst.shape)}")
    if weight is None:
        weight = torch.ones(dst.shape, dtype=torch.float32, device=x.device)
    if weight.shape != dst.shape or not weight.is_floating_point():
        raise ValueError(f"merge_tokens: weight must be a float [B, N] = {tuple(dst.shape)}, got {tuple(weight.shape)}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"merge_tokens: slots must be an int >= 1, got {slots!r}")
    if dst.device != x.device or weight.device != x.device:
        raise ValueError("merge_tokens: x, dst and weight must be on one device")
    if check and dst.numel() and (int(dst.min()) < -1 or int(dst.max()) >= slots):
        raise IndexError(f"merge_tokens: dst values must lie in [0, {slots}) (or -1), got [{int(dst.min())}, {int(dst.max())}]")
    if not use_triton(x, backend):
        return merge_tokens_reference(x, dst, weight, slots)
    batch, tokens, features = x.shape
    acc = torch.zeros(batch, slots, features, dtype=torch.float32, device=x.device)
    total = torch.zeros(batch, slots, dtype=torch.float32, device=x.device)
    if tokens and features:
        block_n = block_size(tokens, maximum=64)
        block_d = block_size(features, maximum=128)
        grid = (batch, -(-tokens // block_n), -(-features // block_d))
        _merge_kernel()[grid](
            x, dst, weight, acc, total, tokens, slots, features,
            *x.stride(), *dst.stride(), *weight.stride(),
            BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    return _normalise(acc, total, x.dtype)
