"""Token budgets: one place that turns a user's ``keep`` into a count per image."""

from __future__ import annotations

import math
import numbers

Keep = int | float


def validate_keep(keep: object, name: str = "keep") -> Keep:
    """Check a budget and return it unchanged.

    ``keep`` is an int >= 1 (visual tokens kept per image) or a float in (0, 1] (fraction of each image's tokens).
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(
            f"{name} must be an int >= 1 (tokens kept per image) or a float in (0, 1] (fraction kept), "
            f"got {keep!r} of type {type(keep).__name__}"
        )
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"{name} must be an int >= 1 (tokens kept per image) or a float in (0, 1], got {keep}")
        return int(keep)
    value = float(keep)
    if not math.isfinite(value) or value <= 0.0 or value > 1.0:
        raise ValueError(
            f"{name} as a fraction must lie in (0, 1], got {keep}; pass an int for an absolute number of tokens"
        )
    return value


def tokens_to_keep(keep: Keep, available: int) -> int:
    """Tokens an image with ``available`` prunable tokens keeps under budget ``keep``.

    A fraction rounds to the nearest count (FasterVLM's 576 x 0.1 -> 58) and never drops an image entirely.
    """
    if available <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, available)
    return min(available, max(1, round(keep * available)))
