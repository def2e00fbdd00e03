"""gather_tokens and compact_kv: the Triton kernels against their torch references under TRITON_INTERPRET=1 on CPU
(small shapes), and the dispatchers' input checks."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.common import DTYPES, interpreted
from vtprune.kernels import (
    compact_kv,
    compact_kv_reference,
    gather_tokens,
    gather_tokens_reference,
)
from vtprune.kernels._triton import triton_available, use_triton

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
