"""Triton availability and lazy kernel definition.

Kernels are defined on first use, not at import: Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so
the CPU interpreter tests can switch it on after vtprune has been imported. Each op module asks
:func:`jit` for its kernel; the cache key includes the interpreter flag.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the torch path"
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(build: Callable[[], Any]) -> Callable[[], Any]:
    """Decorate a zero-argument function that defines and returns a ``@triton.jit`` kernel."""

    @functools.cache
    def cached(interpret: bool) -> Any:
        return build()

    return lambda: cached(interpret_mode())


def use_triton(tensor: Tensor, backend: str) -> bool:
    """Whether to launch the Triton kernel for ``tensor``: on CUDA tensors (or anywhere in interpreter mode) when
    ``backend`` is "auto", always for "triton", never for "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton cannot be imported")
        if not tensor.is_cuda and not interpret_mode():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        return True
    return tensor.is_cuda and triton_available()


def block_size(value: int, *, minimum: int = 16, maximum: int = 1024) -> int:
    """The power of two >= ``value`` within [minimum, maximum] (Triton block shapes are powers of two)."""
    size = minimum
    while size < value and size < maximum:
        size *= 2
    return size
