"""merge_tokens: the Triton kernel against its torch reference (and a plain loop) under TRITON_INTERPRET=1 on CPU,
and the dispatcher's input checks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.kernels.common import DTYPES, interpreted
from vtprune.kernels import merge_tokens, merge_tokens_reference


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
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.tensor([[0, 1, 2, 3]]), None, 3), IndexError, r"lie in \[0, 3\)"),
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.tensor([[0, 1]]), None, 3), ValueError, r"dst must be"),
        (lambda: merge_tokens(torch.randn(1, 4, 3).int(), torch.zeros(1, 4, dtype=torch.long), None, 1), TypeError, r"float32"),
        (lambda: merge_tokens(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), None, 0), ValueError, r"slots"),
    ],
)
def test_bad_inputs_fail_before_any_kernel(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
