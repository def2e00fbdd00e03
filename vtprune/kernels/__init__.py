"""Data-movement ops used by the engine and the merging methods: one module per op, each with a torch reference
and a dispatcher the rest of the package calls."""

from vtprune.kernels.gather import gather_tokens

__all__ = ["gather_tokens"]
