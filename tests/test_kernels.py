"""Every Triton kernel against its torch reference under TRITON_INTERPRET=1 on CPU (small shapes), and the
dispatchers' input checks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vtprune.kernels import (
    compact_kv,
    compact_kv_reference,
    gather_tokens,
    gather_tokens_reference,
    merge_tokens,
    merge_tokens_reference,
)
from vtprune.kernels._triton import triton_available, use_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
interpreted = pytest.mark.skipif(not triton_available(), reason="triton is not importable here")


@pytest.fixture
def interpreter(monkeypatch):
    # Triton reads the flag when a kernel is defined; vtprune defines kernels lazily, per flag value.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# (batch, rows, features, kept): odd D, B > 1, K = 1, K = N, K > N (repeats)
GATHER_SHAPES = [(2, 37, 33, 11), (3, 9, 5, 1), (1, 16, 130, 16), (2, 7, 1, 20)]


@interpreted
@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gather_tokens_kernel_matches_reference(interpreter, shape, dtype):
    batch, rows, features, kept = shape
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, rows, features, generator=generator).to(dtype)
    index = torch.randint(-1, rows, (batch, kept), generator=generator)  # unsorted, repeated, -1 = padding
    out = gather_tokens(x, index, backend="triton")
    assert torch.equal(out, gather_tokens_reference(x, index))
    assert torch.equal(out[index >= 0], x[torch.arange(batch)[:, None].expand_as(index)[index >= 0], index[index >= 0]])
    assert out[index < 0].abs().sum() == 0


@interpreted
@pytest.mark.triton
def test_gather_tokens_kernel_on_strided_input_and_int32_index(interpreter):
    x = torch.randn(3, 40, 24)[:, ::2, 1:18]  # non-contiguous rows and features
    index = torch.tensor([[0, 19, 3], [5, 5, 5], [-1, 2, 19]], dtype=torch.int32)
    assert torch.equal(gather_tokens(x, index, backend="triton"), gather_tokens_reference(x, index))


@interpreted
@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 20, 17, 5), (1, 4, 8, 64, 8), (3, 2, 9, 3, 1)])
def test_compact_kv_kernel_matches_reference(interpreter, shape, dtype):
    batch, heads, rows, dim, kept = shape
    generator = torch.Generator().manual_seed(sum(shape))
    cache = torch.randn(batch, heads, rows, dim, generator=generator).to(dtype)
    index = torch.stack([torch.randperm(rows, generator=generator)[:kept].sort().values for _ in range(batch)])
    out = compact_kv(cache, index, backend="triton")
    assert out.shape == (batch, heads, kept, dim)
    assert torch.equal(out, compact_kv_reference(cache, index))
    assert torch.equal(out[1 % batch, 0], cache[1 % batch, 0, index[1 % batch]])


def _merge_by_loop(x, dst, weight, slots):
    out = torch.zeros(x.shape[0], slots, x.shape[2])
    for b in range(x.shape[0]):
        for k in range(slots):
            members = dst[b] == k
            if members.any():
                w = weight[b, members].float()
                out[b, k] = (x[b, members].float() * w[:, None]).sum(0) / w.sum()
    return out


@interpreted
@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 33, 6), (1, 10, 5, 1), (3, 8, 70, 8), (2, 5, 3, 7)])
def test_merge_tokens_kernel_matches_reference(interpreter, shape, dtype):
    batch, tokens, features, slots = shape
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, tokens, features, generator=generator).to(dtype)
    dst = torch.randint(-1, slots, (batch, tokens), generator=generator)
    weight = torch.rand(batch, tokens, generator=generator) + 0.1
    out = merge_tokens(x, dst, weight, slots, backend="triton")
    reference = merge_tokens_reference(x, dst, weight, slots)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert out.dtype == dtype
    assert_close(out.float(), reference.float(), rtol=tolerance, atol=tolerance)
    assert_close(reference.float(), _merge_by_loop(x, dst, weight, slots), rtol=tolerance, atol=tolerance)


def test_merge_tokens_plain_mean_and_empty_slots():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]]])
    out = merge_tokens(x, torch.tensor([[0, 0, -1]]), None, 2)
    assert out.tolist() == [[[2.0, 3.0], [0.0, 0.0]]]


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, 5], [1, 2]])), IndexError, r"lie in \[0, 5\)"),
        (lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, -2], [1, 2]])), IndexError, r"got \[-2, 2\]"),
        (lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, 1]])), ValueError, r"batch 1 .* batch 2"),
        (lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0.0], [1.0]])), TypeError, r"int32 or int64"),
        (lambda: gather_tokens(torch.randn(5, 3), torch.tensor([[0]])), ValueError, r"must be \[B, N, D\]"),
        (lambda: compact_kv(torch.randn(2, 2, 5, 3).double(), torch.tensor([[0], [1]])), TypeError, r"float32, float16"),
        (lambda: compact_kv(torch.randn(2, 2, 5, 3), torch.tensor([[0], [9]])), IndexError, r"lie in \[0, 5\)"),
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.tensor([[0, 1, 2, 3]]), None, 3), IndexError, r"lie in \[0, 3\)"),
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.tensor([[0, 1]]), None, 3), ValueError, r"dst must be"),
        (lambda: merge_tokens(torch.randn(1, 4, 3).int(), torch.zeros(1, 4, dtype=torch.long), None, 1), TypeError, r"float32"),
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), None, 0), ValueError, r"slots"),
        (lambda: gather_tokens(torch.randn(1, 4, 3), torch.zeros(1, 1, dtype=torch.long), backend="cuda"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_inputs_fail_before_any_kernel(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_dispatch_uses_the_reference_off_gpu():
    x = torch.randn(1, 4, 3)
    assert not use_triton(x, "auto")
    assert not use_triton(x, "torch")
    if triton_available():
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            use_triton(x, "triton")
    assert torch.equal(gather_tokens(x, torch.tensor([[3, 0]])), x[:, [3, 0]])


def test_gather_tokens_on_integer_positions_uses_torch():
    positions = torch.arange(10).view(1, 10, 1)
    assert gather_tokens(positions, torch.tensor([[9, 2]])).flatten().tolist() == [9, 2]
