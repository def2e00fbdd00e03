"""The prune context: what a method sees at one pruning point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage


@dataclass
class ItemView:
    """One image (or frame) as it stands at this pruning point.

    ``tokens`` are the item's surviving tokens in its original numbering (ascending), ``slots`` where they sit in
    row ``item.sample`` of the current layout, ``features`` their projected features (before the LLM only).
    """

    item: VisualItem
    order: int
    tokens: Tensor
    slots: Tensor
    selectable: Tensor
    budget: int
    features: Tensor | None = None

    @property
    def sample(self) -> int:
        return self.item.sample

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


@dataclass
class PruneContext:
    """Everything a method may read at one stage.

    ``hidden_states`` is the input of decoder layer ``stage.layer`` (in-LLM stages). ``attention()`` returns the
    head-averaged attention probabilities of the stage's query token(s) to every slot of ``layout``, ``[B, L]``,
    recomputed from layer ``stage.attention_from``'s queries and keys.
    """

    stage: Stage
    model: ModelInfo
    layout: Layout
    items: list[ItemView]
    hidden_states: Tensor | None = None
    _attention: Callable[[], Tensor] | None = field(default=None, repr=False)
    _attention_cache: Tensor | None = field(default=None, repr=False)

    def attention(self) -> Tensor:
        if self._attention is None:
            raise RuntimeError(
                "this stage did not request attention rows: set Stage.attention_from in the method's stages()"
            )
        if self._attention_cache is None:
            self._attention_cache = self._attention()
        return self._attention_cache

    def per_item(self, values: Tensor) -> list[Tensor]:
        """Split a ``[B, L]`` per-slot tensor into one tensor per item (its current tokens, in order)."""
        return [values[view.sample, view.slots] for view in self.items]
