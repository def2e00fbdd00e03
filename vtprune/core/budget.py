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


def parse_budget(text: str) -> Keep | tuple[Keep, ...]:
    """A budget typed on a command line or in lmms-eval's ``model_args``: ``"64"`` (tokens), ``"0.25"`` (fraction),
    or ``"128/64"``: one budget per part of a composed method (``keep=(128, 64)``), each checked."""
    parts = [part.strip() for part in str(text).split("/")]
    values: list[Keep] = []
    for part in parts:
        try:
            value: Keep = int(part)
        except ValueError:
            try:
                value = float(part)
            except ValueError:
                raise ValueError(
                    f"keep must be an int >= 1, a float in (0, 1], or per-part budgets such as 128/64; got {text!r}"
                ) from None
        values.append(validate_keep(value))
    return values[0] if len(values) == 1 else tuple(values)


def budget_label(keep: Keep | tuple[Keep, ...] | list[Keep] | None) -> str:
    """``64`` -> ``"64"``, ``(128, 64)`` -> ``"128/64"`` (how tables and commands write per-part budgets)."""
    if keep is None:
        return "-"
    if isinstance(keep, (tuple, list)):
        return "/".join(f"{part:g}" for part in keep)
    return f"{keep:g}"


def tokens_to_keep(keep: Keep, available: int) -> int:
    """Tokens an image with ``available`` prunable tokens keeps under budget ``keep``.

    A fraction rounds to the nearest count (FasterVLM's 576 x 0.1 -> 58) and never drops an image entirely.
    """
    if available <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, available)
    return min(available, max(1, round(keep * available)))


BUDGET_CONVENTIONS = ("final", "average")
# What ``keep`` counts on a video: its whole token count ("video", the default: a method may move budget between
# its frames, EVS keeping frame 0 whole and later frames possibly none) or each frame's ("frame", each frame its own
# item with its own budget). Images are unaffected.
BUDGET_UNITS = ("video", "frame")


def stage_budgets(
    keep: Keep,
    available: int,
    stages: list[tuple[int | None, float]],
    num_layers: int,
    convention: str = "final",
) -> list[int]:
    """Tokens an image (or view) of ``available`` prunable tokens keeps after each stage ``(layer, scale)``.

    ``convention="final"``: ``keep`` counts the tokens the LLM finally sees; stage i keeps ``scale_i`` times that.
    ``convention="average"``: ``keep`` is the equivalent average over all decoder layers, the accounting of
    in-LLM papers (SparseVLM, PyramidDrop, EntropyPrune): the final budget is the largest whose layer-average of
    visual tokens does not exceed ``keep``; for one stage at layer K this is EntropyPrune's
    ``int((L * avg - K * N) / (L - K))``.
    """
    if convention not in BUDGET_CONVENTIONS:
        raise ValueError(f"budget must be one of {BUDGET_CONVENTIONS}, got {convention!r}")
    if available <= 0:
        return [0] * len(stages)

    def budgets(final: int) -> list[int]:
        # scale 0: an in-LLM stage that drops every visual token (ToDRE's drop_all)
        return [0 if scale == 0 else min(available, max(1, round(scale * final))) for _, scale in stages]

    if convention == "final":
        return budgets(tokens_to_keep(keep, available))
    target = keep * available if isinstance(keep, float) else keep
    starts = [0 if layer is None else layer for layer, _ in stages]

    def average(final: int) -> float:
        counts = budgets(final)
        total, current = 0, available
        for layer in range(num_layers):
            for start, count in zip(starts, counts):
                if start == layer:
                    current = count
            total += current
        return total / num_layers

    best = 1
    low, high = 1, available
    while low <= high:  # the layer average grows with the final budget
        middle = (low + high) // 2
        if average(middle) <= target + 1e-9:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return budgets(best)


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Split ``budget`` over parts in proportion to ``sizes`` (largest remainder, each part at most its size)."""
    total = sum(sizes)
    shares = [budget * s / total for s in sizes]
    counts = [min(s, math.floor(x)) for s, x in zip(sizes, shares)]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order:
        if sum(counts) >= budget:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
    return counts


def pooled_shape(height: int, width: int, count: int) -> tuple[int, int]:
    """The largest ``rows x cols <= count`` on ``height x width``; among equal products, the aspect closest to the grid's."""
    best = (1, 1)
    for rows in range(1, height + 1):
        cols = min(width, count // rows)
        if cols < 1:
            break
        key = (rows * cols, -abs(rows / cols - height / width))
        if key > (best[0] * best[1], -abs(best[0] / best[1] - height / width)):
            best = (rows, cols)
    return best
