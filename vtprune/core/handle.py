"""The handle ``vtprune.wrap`` returns: what the last forward kept, and how to undo the wrap."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from vtprune.core.budget import Keep, tokens_to_keep
from vtprune.core.engine import PruningEngine
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import Method

WRAPPED_ATTRIBUTE = "_vtprune_pruning"


class Pruning:
    """A wrapped model's pruning: read what was kept, freeze a selection, or ``unwrap()``.

    Also a context manager: leaving the ``with`` block unwraps the model, whether or not an exception was raised.
    """

    def __init__(self, engine: PruningEngine) -> None:
        self._engine = engine
        self._active = True

    @property
    def method(self) -> Method:
        return self._engine.method

    @property
    def keep(self) -> Keep:
        return self._engine.keep

    @property
    def model(self) -> Any:
        return self._engine.model

    @property
    def family(self) -> str:
        return self._engine.adapter.family

    @property
    def modalities(self) -> tuple[str, ...]:
        """The kinds of visual items ("image", "video") this pruning reduces on this model before or during the
        prefill; items of other kinds keep every token there (a video method leaves images whole)."""
        kinds: set[str] = set(self._engine.info.modalities) if self._engine.tower is not None else set()
        for stage in self._engine.stages:
            kinds |= set(stage.modalities or self._engine.info.modalities)
        return tuple(kind for kind in self._engine.info.modalities if kind in kinds)

    @property
    def synchronize_timers(self) -> bool:
        """Whether the overhead timers wait for the GPU (exact device time, slightly slower); off by default."""
        return self._engine.synchronize_timers

    @synchronize_timers.setter
    def synchronize_timers(self, value: bool) -> None:
        self._engine.synchronize_timers = bool(value)

    @property
    def active(self) -> bool:
        return self._active

    @property
    def last(self) -> ForwardRecord | None:
        """Record of the last prefill forward (None before the first one with images)."""
        return self._engine.last

    @property
    def kept(self) -> list[list[Tensor]]:
        """Per stage, per sample: indices of the kept tokens in that sample's original visual tokens."""
        record = self._engine.last
        return [stage.kept for stage in record.stages] if record is not None else []

    @property
    def seq_lens(self) -> list[int]:
        """Sequence length entering each decoder layer in the last prefill."""
        record = self._engine.last
        return list(record.seq_lens) if record is not None else []

    def config(self) -> dict[str, Any]:
        """Everything that defines this pruning, for results files: method, its options, the budget."""
        return {
            **self.method.to_dict(),
            "keep": self.keep,
            "budget": self._engine.budget,
            "budget_unit": self._engine.budget_unit,
            "family": self.family,
        }

    def to_json(self) -> str:
        return json.dumps(self.config(), sort_keys=True)

    def tokens_after_pruning(self, num_visual_tokens: int) -> int:
        """Tokens an image of ``num_visual_tokens`` prunable tokens leaves for the LLM, known before the forward.

        Only for methods whose count depends on the budget alone (``count_known_early``).
        """
        if not self.method.count_known_early():
            raise ValueError(f"{self.method.name} does not fix its token count before the forward")
        return tokens_to_keep(self.keep, num_visual_tokens)

    @contextmanager
    def freeze(self) -> Iterator[Pruning]:
        """Reuse the last prefill's selection (same images) instead of selecting again, e.g. to recompute a
        generated sequence without cache under exactly the selection the cached run made."""
        if self._engine.last is None:
            raise RuntimeError("nothing to freeze: run a forward with images first")
        self._engine.frozen = self._engine.last
        try:
            yield self
        finally:
            self._engine.frozen = None

    def unwrap(self) -> Any:
        """Remove every hook; the model then behaves exactly as if it had never been wrapped. Idempotent."""
        if self._active:
            self._engine.remove()
            for module in {id(m): m for m in (self._engine.model, self._engine.adapter.vlm)}.values():
                if getattr(module, WRAPPED_ATTRIBUTE, None) is self:
                    delattr(module, WRAPPED_ATTRIBUTE)
            self._active = False
        return self._engine.model

    def __enter__(self) -> Pruning:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        state = "active" if self._active else "unwrapped"
        return f"Pruning({self.method!r}, keep={self.keep!r}, family={self.family!r}, {state})"
