"""Shared by the kernel tests: the dtypes every kernel is checked in, and the skip when Triton is missing."""

from __future__ import annotations

import pytest
import torch

from vtprune.kernels._triton import triton_available

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
interpreted = pytest.mark.skipif(not triton_available(), reason="triton is not importable here")
