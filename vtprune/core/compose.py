"""Composing methods: the stages of several methods in one forward, each part with its own budget.

``vtprune.wrap(model, vtprune.Compose(vtprune.DivPrune(), vtprune.Random(layer=16)), keep=(128, 64))`` prunes each
image to 128 tokens before the LLM by DivPrune, then to 64 at decoder layer 16 at random; by name,
``vtprune.wrap(model, "divprune+random", keep=(128, 64), **{"random.layer": 16})`` (options name their part).

* Budgets: one ``keep`` per part, each the budget its part ends at (non-increasing, all counts or all fractions);
  a part with several stages scales them from its own budget as it does alone. A single ``keep`` gives every part
  that budget, so a later part prunes only what an earlier one's schedule still keeps above it.
* Order: every stage of a part comes after every stage of the part before it (at most one part prunes before the
  LLM, and it comes first).
* Positions: each part's stages number positions by the part's own convention (pre-LLM parts usually renumber,
  FastV-like parts keep), unless ``positions=`` sets one for all.
* Each part scores its own stages with its own ``state`` (``observe`` sees the layers it asked for), decode-time
  stages included (MustDrop's cache policy, DyCoke's decode masks: each part's ``DecodeStage`` carries its index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from vtprune.core.budget import Keep, validate_keep
from vtprune.core.registry import (
    POSITION_CONVENTIONS,
    DecodeStage,
    Method,
    ModelInfo,
    Stage,
    make_method,
)

COMPOSE = "compose"


@dataclass(init=False)
class Compose(Method):
    """Several methods' stages in one forward (see the module docstring)."""

    name: ClassVar[str] = COMPOSE
    summary: ClassVar[str] = "the stages of several methods in one forward, each part with its own budget"
    paper: ClassVar[str] = "vtprune"

    parts: tuple[Method, ...] = ()
    # None: each part's own convention
    positions: str | None = None
    keeps: tuple[Keep, ...] = field(default=())

    def __init__(
        self,
        *parts: Method | dict[str, Any],
        positions: str | None = None,
        keeps: Sequence[Keep] = (),
        **fields: Any,
    ) -> None:
        if "parts" in fields:  # dataclasses.replace and from_dict pass the parts by keyword
            parts = tuple(fields.pop("parts"))
        if fields:
            raise ValueError(f"{COMPOSE}: unknown option(s) {', '.join(sorted(fields))}; allowed: parts, positions, keeps")
        self.parts = tuple(Method.from_dict(p) if isinstance(p, dict) else p for p in parts)
        if len(self.parts) < 2:
            raise ValueError(f"{COMPOSE}: needs at least two methods to compose, got {len(self.parts)}")
        for part in self.parts:
            if not isinstance(part, Method) or isinstance(part, Compose):
                raise ValueError(
                    f"{COMPOSE}: parts must be LLM-side method configs such as vtprune.DivPrune() (not nested "
                    f"compositions or ViT methods), got {type(part).__name__}"
                )
        if positions is not None and positions not in POSITION_CONVENTIONS:
            raise ValueError(
                f"{COMPOSE}: positions must be None (each part's own) or one of {POSITION_CONVENTIONS}, got {positions!r}"
            )
        self.positions = positions
        self.keeps = tuple(keeps)
        if self.keeps:
            check_keeps(self.label, self.keeps, len(self.parts))

    @property
    def label(self) -> str:
        """The composed name, e.g. ``divprune+random``."""
        return "+".join(part.name for part in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": COMPOSE,
            "parts": [part.to_dict() for part in self.parts],
            "positions": self.positions,
            "keeps": list(self.keeps),
        }

    def count_known_early(self) -> bool:
        # conservative: the visual tokens the LLM receives are known early when no part prunes after a signal
        return all(part.count_known_early() for part in self.parts)

    def part_keeps(self, keep: Keep) -> tuple[Keep, ...]:
        return self.keeps or (keep,) * len(self.parts)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        keeps = self.part_keeps(keep)
        final = keeps[-1]
        stages: list[Stage] = []
        previous: tuple[str, int] | None = None
        for index, (part, part_keep) in enumerate(zip(self.parts, keeps)):
            own = part.stages(model, part_keep)
            first = -1 if own[0].layer is None else own[0].layer
            if previous is not None and first <= previous[1]:
                where = "before the LLM" if previous[1] < 0 else f"at layer {previous[1]}"
                raise ValueError(
                    f"{self.label}: {part.name} starts {'before the LLM' if first < 0 else f'at layer {first}'}, "
                    f"not after {previous[0]}'s last stage ({where}); give {part.name} a later layer (e.g. the "
                    f"option {part.name}.layer=K)"
                )
            ratio = part_keep / final
            positions = self.positions or part.positions
            stages += [dataclasses.replace(s, scale=s.scale * ratio, part=index, positions=positions) for s in own]
            last = own[-1].layer
            previous = (part.name, -1 if last is None else last)
        return stages

    def decode_stages(self, model: ModelInfo, keep: Keep) -> list[DecodeStage]:
        # every part's decode stages, each ranked by its own part (DecodeStage.part)
        return [
            dataclasses.replace(stage, part=index)
            for index, (part, part_keep) in enumerate(zip(self.parts, self.part_keeps(keep)))
            for stage in part.decode_stages(model, part_keep)
        ]

    def observed_layers(self, model: ModelInfo) -> tuple[int, ...]:
        # the engine asks once, at wrap: remember which part observes which layer
        self._observers = [set(part.observed_layers(model)) for part in self.parts]
        return tuple(sorted(set().union(*self._observers)))

    def observe(self, state: dict, layer: int, part: str, inputs: Tensor, output: Tensor, layout: Any) -> None:
        for index, (method, layers) in enumerate(zip(self.parts, self._observers)):
            if layer in layers:
                method.observe(state.setdefault(index, {}), layer, part, inputs, output, layout)

    def scorer(self, stage: Stage, state: dict) -> tuple[Method, dict]:
        return self.parts[stage.part], state.setdefault(stage.part, {})

    def target_grid(self, rows: int, cols: int, budget: int) -> tuple[int, int]:
        resampling = [part for part in self.parts if hasattr(part, "target_grid")]
        return resampling[0].target_grid(rows, cols, budget)


def check_keeps(label: str, keeps: Sequence[Keep], parts: int) -> tuple[Keep, ...]:
    """Validate one budget per part: as many as parts, all counts or all fractions, never growing."""
    if len(keeps) != parts:
        raise ValueError(f"{label}: keep needs one budget per part ({parts}), got {tuple(keeps)}")
    keeps = tuple(validate_keep(k, "keep") for k in keeps)
    if len({type(k) for k in keeps}) > 1:
        raise ValueError(f"{label}: keep must be all token counts or all fractions, got {keeps}")
    for earlier, later in zip(keeps, keeps[1:]):
        if later > earlier:
            raise ValueError(f"{label}: a later part cannot keep more than an earlier one, got keep={keeps}")
    return keeps


def compose_by_name(name: str, **options: Any) -> Compose:
    """``"divprune+random"`` with options named by part (``{"random.layer": 16}``), or ``"compose"`` with
    ``parts`` (as :meth:`Compose.to_dict` writes it)."""
    if name == COMPOSE:
        return Compose(**options)
    names = name.split("+")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"{name!r}: a composed name joins distinct method names with '+' (e.g. 'divprune+random'); to compose a "
            "method with itself pass vtprune.Compose(...) configs"
        )
    per_part: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        part, _, option = key.partition(".")
        if not option or part not in per_part:
            raise ValueError(
                f"{name}: options of a composed method name their part, e.g. {names[-1]}.layer=16; got {key!r}"
            )
        per_part[part][option] = value
    return Compose(*(make_method(n, **per_part[n]) for n in names))
