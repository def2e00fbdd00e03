"""One look for every plot that draws methods: a colour and a marker per method name, FLOPs and budget axes.

**Method styles.** :data:`COLOURS` holds 40 colours picked greedily for the largest smallest CIEDE2000 distance
to each other and to black, white and grey (which the plots keep for dense, the background and the grid), from
sRGB colours of CIELAB lightness 30-72 and chroma >= 30: every pair is at least 12.9 apart (the first 20 at least
17.9), so no two slots read as the same colour on a white background. Slot ``i`` also gets marker
``MARKERS[i % 9]`` (the star is kept for dense), so colour and marker together tell methods apart in grey print
or for colour-blind readers.

A method's slot depends on its name only, never on which other methods a plot draws:

* the names in :data:`KNOWN_METHODS` (the methods registered when the palette was made, alphabetically, then
  later ones appended) own slots ``0 .. len(KNOWN_METHODS) - 1`` in that order. New names are appended, never
  inserted, so no listed method ever changes colour;
* any other name (a method registered later or by a user) ranks the remaining slots by SHA-256 of
  ``"name/slot"`` (rendezvous hashing: the same in every process and version) and takes its first. Appending a
  name to :data:`KNOWN_METHODS` moves only the names whose first choice was the slot it takes, and a name added
  to or removed from a plot moves no other name, except that two names with the same first choice in one plot
  cannot both have it: :func:`method_styles`, which styles the methods of one plot, gives it to the first by
  sorted name and moves the other to its next choice, so one plot never shows two methods alike while it draws
  at most 40 (the free slots of listed methods absent from the plot are the last choices); beyond 40 slots
  repeat, with dashed lines.

**Axes.** :func:`flops_unit` picks TFLOPs or GFLOPs (MFLOPs below 0.01 GFLOPs) so that the numbers read plainly;
:func:`plain_numbers` and :func:`budget_axis` keep matplotlib from writing ``x1e-4`` offsets or ``2^3`` ticks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# 40 colours, most distinct first (greedy max-min CIEDE2000 over sRGB at steps of 15, seeded with matplotlib's
# first colour, lightness 30-72, chroma >= 30, kept away from black, white and grey)
COLOURS = (
    "#1e78b4", "#7800a5", "#960000", "#00c300", "#ff9600", "#ff4bff", "#005a00", "#00c3c3", "#ff4b5a", "#694b00",
    "#a5a5f0", "#a59600", "#b40f5a", "#007869", "#b4693c", "#7869a5", "#e196b4", "#00b4ff", "#69874b", "#2d4bff",
    "#f09678", "#ff2d96", "#5ab487", "#1e4b78", "#b40fff", "#e10f00", "#b46978", "#5a3c69", "#a5b478", "#a54b96",
    "#0096b4", "#96783c", "#696900", "#ff5a00", "#6978ff", "#b478c3", "#874b3c", "#c39669", "#d20f3c", "#009600",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p", "h")
SLOTS = len(COLOURS)

# Registered names own the first slots in this order. Append new names at the end; never reorder or remove one
# (a removed method's slot stays reserved), or methods change colour between versions.
KNOWN_METHODS = (
    "dart", "divprune", "downsample", "dtop", "entropyprune", "evit", "fastervlm", "fastv", "hiprune", "mmtok",
    "pdrop", "pool", "random", "sparsevlm", "tome", "transprune", "uniform", "visiondrop", "visionzip", "vispruner",
    "vtc_cls", "vflowopt", "flowcut", "todre", "zoo_prune", "infohorizon", "catp", "adaptinfer", "mustdrop", "evs",
    "dycoke", "fastvid", "holitom", "prunevid",
)  # fmt: skip

DENSE = "dense"


@dataclass(frozen=True)
class Style:
    """How one method is drawn: ``colour``, ``marker``, ``linestyle`` and its palette ``slot``."""

    colour: str
    marker: str
    linestyle: str = "-"
    slot: int = 0

    def line(self) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot``."""
        return {"color": self.colour, "marker": self.marker, "linestyle": self.linestyle}

    def points(self) -> dict[str, Any]:
        """Keyword arguments for ``Axes.scatter``."""
        return {"color": self.colour, "marker": self.marker}


DENSE_STYLE = Style("#000000", "*", "--", -1)


def _style(slot: int) -> Style:
    return Style(COLOURS[slot % SLOTS], MARKERS[slot % SLOTS % len(MARKERS)], "-" if slot < SLOTS else "--", slot)


def slot_ranking(name: str) -> list[int]:
    """The slots a name not in :data:`KNOWN_METHODS` would take, best first: the free slots in the order of
    ``sha256("name/slot")``, then the listed methods' slots in that order (used only when a plot lacks them)."""
    order = sorted(range(SLOTS), key=lambda slot: hashlib.sha256(f"{name}/{slot}".encode()).digest())
    owned = len(KNOWN_METHODS)
    return [slot for slot in order if slot >= owned] + [slot for slot in order if slot < owned]


def preferred_slot(name: str) -> int:
    """The palette slot of ``name`` alone: its index in :data:`KNOWN_METHODS`, else its first hashed choice."""
    return KNOWN_METHODS.index(name) if name in KNOWN_METHODS else slot_ranking(name)[0]


def method_style(name: str) -> Style:
    """The style of ``name`` (dense: a black star and a dashed line)."""
    return DENSE_STYLE if name == DENSE else _style(preferred_slot(name))


def method_styles(names: Iterable[str]) -> dict[str, Style]:
    """Styles of the methods one plot draws: each its :func:`method_style`, except that of two names hashed onto
    the same slot the later by sorted name takes its next free choice (so the result does not depend on the
    order of ``names``)."""
    names = list(dict.fromkeys(names))
    styles: dict[str, Style] = {}
    taken: set[int] = set()
    for name in sorted(names, key=lambda n: (n not in KNOWN_METHODS, n)):  # listed names first: they own their slot
        if name == DENSE:
            styles[name] = DENSE_STYLE
            continue
        if name in KNOWN_METHODS:
            slot = KNOWN_METHODS.index(name)
        else:
            slot = next((s for s in slot_ranking(name) if s not in taken), SLOTS + len(taken))  # > 40: repeat, dashed
        taken.add(slot)
        styles[name] = _style(slot)
    return {name: styles[name] for name in names}


# -- axes --------------------------------------------------------------------------------------------------------------

FLOPS_UNITS = (("PFLOPs", 1e3), ("TFLOPs", 1.0), ("GFLOPs", 1e-3), ("MFLOPs", 1e-6))  # size of the unit in TFLOPs


def flops_unit(tflops: Iterable[float | None]) -> tuple[str, float]:
    """``(unit, factor)`` for values given in TFLOPs: ``value * factor`` is in ``unit``. TFLOPs from 1 TFLOP up
    (PFLOPs from 1000), GFLOPs below, MFLOPs where even the largest value is under 0.01 GFLOPs."""
    values = [abs(v) for v in tflops if v is not None and math.isfinite(v)]
    largest = max(values, default=0.0)
    if largest >= 1e3:
        unit, size = FLOPS_UNITS[0]
    elif largest >= 1.0:
        unit, size = FLOPS_UNITS[1]
    elif largest >= 1e-5 or largest == 0.0:
        unit, size = FLOPS_UNITS[2]
    else:
        unit, size = FLOPS_UNITS[3]
    return unit, 1.0 / size


def plain_numbers(axis: Any) -> None:
    """Tick labels of one axis (``Axes.xaxis`` / ``yaxis``) as plain numbers: no offset, no ``1e-4`` multiplier."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def budget_ticks(values: Iterable[float | None]) -> list[float]:
    """Ticks for token counts on a log2 axis: the powers of two spanning ``values``, with the midpoints
    (24 between 16 and 32) added when that leaves fewer than 4 ticks."""
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not values:
        return []
    low, high = math.floor(math.log2(min(values))), math.ceil(math.log2(max(values)))
    ticks = [2.0**k for k in range(low, high + 1)]
    if len(ticks) < 4:
        ticks = sorted([*ticks, *(3 * 2.0 ** (k - 2) for k in range(low + 1, high + 1))])
    return ticks


def budget_axis(axes: Any, values: Iterable[float | None], which: str = "x") -> None:
    """A log2 token-count axis on ``axes`` whose ticks read 4, 8, 16 (not 2^2, 2^3, 2^4)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    axis = axes.xaxis if which == "x" else axes.yaxis
    (axes.set_xscale if which == "x" else axes.set_yscale)("log", base=2)
    ticks = budget_ticks(values)
    if ticks:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())
