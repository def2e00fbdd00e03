"""The transformers internals whose names or signatures move between releases, behind one small interface.

vtprune hooks into a VLM's forward, so it depends on more than transformers' public API. Everything that has
changed between the releases we test, or that a release has announced it will change, goes through this module,
so that the next change breaks one function here rather than the engine or an adapter:

* the cache argument and output field: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the old name is
  accepted with a warning until 5.40) — in the multimodal forward's arguments, the per-layer mask builders,
  Qwen's ``compute_3d_position_ids`` and model outputs;
* the per-layer mask builders themselves (``create_causal_mask`` / ``create_sliding_window_causal_mask``), called
  with their cache argument in its positional slot, which both spellings share.

The other internals vtprune uses have kept their names and signatures across the tested range; the README's
"Supported versions" section lists them all.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import transformers
from packaging.version import Version
from torch import Tensor
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)

# The transformers releases CI tests (`make test` pins the lower end, `make test-latest` the newest allowed);
# pyproject.toml's bound is the same range, a test keeps the two equal.
TESTED_TRANSFORMERS = ("5.23", "5.25")  # [lower, upper)

# Names of the key/value cache argument, newest first.
CACHE_NAMES = ("cache", "past_key_values")

MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    # linear attention (Qwen3.5's Gated DeltaNet) takes only the 2-D padding mask of its own rows
    "linear_attention": create_recurrent_attention_mask,
}
# layer types with softmax attention over keys, whose rows vtprune can recompute from Q/K
SOFTMAX_ATTENTION = ("full_attention", "sliding_attention")

_warned: set[str] = set()


def tested_range() -> str:
    low, high = TESTED_TRANSFORMERS
    return f">={low},<{high}"


def check_transformers_version(version: str | None = None) -> bool:
    """Warn once (per version) when transformers lies outside the tested range; True when it lies inside."""
    version = version or transformers.__version__
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    inside = low <= Version(Version(version).base_version) < high  # a 5.24.0.dev0 counts as 5.24
    if not inside and version not in _warned:
        _warned.add(version)
        warnings.warn(
            f"vtprune is tested with transformers {tested_range()}, but {version} is installed; it may work, but "
            f"hooks into transformers internals that change between releases. Install a tested release with "
            f"pip install 'transformers{tested_range()}' if anything fails.",
            stacklevel=3,
        )
    return inside


def cache_parameter(fn: Callable[..., Any] | inspect.Signature) -> str:
    """The name ``fn`` takes its key/value cache under (its signature's own spelling; the newest by default)."""
    signature = fn if isinstance(fn, inspect.Signature) else inspect.signature(fn)
    return next((name for name in CACHE_NAMES if name in signature.parameters), CACHE_NAMES[0])


def get_cache(arguments: dict[str, Any]) -> Cache | None:
    """The cache among a call's arguments, under either name."""
    for name in CACHE_NAMES:
        if arguments.get(name) is not None:
            return arguments[name]
    return None


def set_cache(arguments: dict[str, Any], cache: Cache | None, name: str) -> dict[str, Any]:
    """Put ``cache`` under ``name`` and drop the other spelling (5.24+ refuses a call that has both)."""
    for other in CACHE_NAMES:
        arguments.pop(other, None)
    arguments[name] = cache
    return arguments


def output_cache(output: Any) -> Cache | None:
    """A model output's cache (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    fields = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_NAMES:
        if name in fields:
            return output[name]
    return None


def build_mask(
    layer_type: str, config: Any, inputs_embeds: Tensor, attention_mask: Tensor, cache: Cache | None, layer: int
) -> Any:
    """The attention mask transformers would build for one decoder layer of ``layer_type`` (a 4-D tensor, a
    BlockMask or None, whatever the attention implementation expects)."""
    builder = MASK_BUILDERS.get(layer_type)
    if builder is None:
        raise NotImplementedError(
            f"vtprune cannot rebuild masks for {layer_type!r} decoder layers (supported: {sorted(MASK_BUILDERS)})"
        )
    # The cache is the fourth positional parameter under both of its names.
    return builder(config, inputs_embeds, attention_mask, cache, layer_idx=layer)
