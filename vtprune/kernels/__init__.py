"""Data-movement ops for token pruning: one module per op, each with a Triton kernel, its torch reference and a
dispatcher (Triton on CUDA tensors, the reference otherwise). The engine and the merging methods call the
dispatchers, never a kernel directly."""

from vtprune.kernels.gather import compact_kv, compact_kv_reference, gather_tokens, gather_tokens_reference
from vtprune.kernels.merge import merge_tokens, merge_tokens_reference

__all__ = [
    "compact_kv",
    "compact_kv_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "merge_tokens",
    "merge_tokens_reference",
]
