"""What one forward in flight carries (prefill or decode step), what decoding after a pruned prefill needs, and
the replacement inputs of the decoder layers after a pruning point."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache

from vtprune.core.adapter import Adapter
from vtprune.core.budget import Keep
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import DecodeStage, Merged, Method, ModelInfo, Stage
from vtprune.core.signals import ImageSignals


@dataclass(frozen=True)
class Schedule:
    """What a wrap applies: the method's stages, the budget ``keep`` and what it counts (``budget``: final or
    layer-average; ``budget_unit``: a whole video or each frame), on the model ``info``."""

    stages: list[Stage]
    keep: Keep
    info: ModelInfo
    budget: str = "final"
    budget_unit: str = "video"


@dataclass
class LayerInputs:
    """Replacement keyword arguments for the decoder layers of one segment (the layers after a pruning point)."""

    masks: dict[str, Any]
    # (cos, sin) per attention type (Gemma 3 rotates sliding and full layers with different tables)
    position_embeddings: dict[str, tuple[Tensor, Tensor]]
    position_ids: Tensor | None


def layer_inputs(
    adapter: Adapter,
    hidden: Tensor,
    cache: Cache | None,
    mask: Tensor,
    positions: Tensor,
    layer: int,
    blocks: Tensor | None = None,
) -> LayerInputs:
    """Masks (one per attention type), rotary tables and position ids for ``hidden`` under a 2-D ``mask``;
    ``blocks``: the bidirectional blocks of ``hidden``'s rows (:attr:`Layout.blocks`; None while decoding)."""
    masks = adapter.attention_masks(hidden, mask, cache, layer, blocks)
    _, layer_positions = adapter.split_positions(positions)
    tables = {layer_type: adapter.rotary(hidden, positions, layer_type) for layer_type in set(adapter.layer_types())}
    return LayerInputs(masks, tables, layer_positions)


@dataclass
class DecodePolicy:
    """A method's decode stages over one generation: what they need to rank cached tokens and what they decided.

    ``steps`` counts decode forwards (1 = the one reading the first generated token); ``pending[item]`` holds the
    item's tokens (its own numbering) dropped during the current step, removed from the cache before the next one;
    ``frozen``: a record whose decode drops are replayed instead of ranking (``Pruning.freeze``); ``state``: the
    prefill's method state, the decode contexts' ``state``.
    """

    method: Method
    stages: list[DecodeStage]
    info: ModelInfo
    items: list[VisualItem]
    record: ForwardRecord
    frozen: ForwardRecord | None = None
    state: dict = field(default_factory=dict)
    steps: int = 0
    pending: dict[int, Tensor] = field(default_factory=dict)
    # masking stages (index into ``stages``) -> item index -> the item's tokens (own numbering) hidden from now on
    masks: dict[int, dict[int, Tensor]] = field(default_factory=dict)


@dataclass
class Session:
    """What decoding after a pruned prefill needs: the cache it filled and its layouts per segment of layers (the
    cached prompt slots of each layer range, shortened by decode-time drops), and the method's decode stages."""

    cache: weakref.ref
    segments: list[Layout]
    prompt_length: int
    decoded: int = 0
    policy: DecodePolicy | None = None

    def segment_of(self, layer: int) -> int:
        return max(i for i, layout in enumerate(self.segments) if layout.first_layer <= layer)


@dataclass
class Prefill:
    """State of a prefill in flight: the items, their features and budgets, the stages still to run, the record."""

    layout: Layout
    cache: Cache | None
    record: ForwardRecord
    items: list[VisualItem] = field(default_factory=list)
    features: dict[int, Tensor] = field(default_factory=dict)
    vision: dict[int, ImageSignals] = field(default_factory=dict)
    budgets: dict[int, list[dict[int, int]]] = field(default_factory=dict)
    instruction_ids: list[Tensor] | None = None
    instruction_embeddings: list[Tensor] | None = None
    state: dict = field(default_factory=dict)  # what the method's observe() wrote
    pending: list[tuple[int, Stage]] = field(default_factory=list)
    segments: list[Layout] = field(default_factory=list)
    layer_inputs: LayerInputs | None = None
    captured: dict[int, dict[str, Any]] = field(default_factory=dict)
    # features merging methods gave the kept tokens at the last stage: item -> (tokens ascending, features)
    merges: dict[int, Merged] = field(default_factory=dict)
    # images re-encoded at a lower resolution: item -> (features, (rows, cols)) (Stage.resample)
    replacements: dict[int, tuple[Tensor, tuple[int, int]]] = field(default_factory=dict)
    # images a reducing vision tower encoded: item -> the tokens its rows stand on (Stage.tower)
    tower_tokens: dict[int, Tensor] = field(default_factory=dict)
    prefill = True


@dataclass
class Decode:
    """State of a decode step in flight after a pruned prefill."""

    layout: Layout
    cache: Cache | None
    session: Session
    new_columns: Tensor
    positions: Tensor
    query_length: int
    # per segment of layers; ("masked", segment, stages): the same with masking decode stages' columns hidden
    segment_inputs: dict[Any, LayerInputs] = field(default_factory=dict)
    # the decode step (1-based) this forward is
    step: int = 0
    prefill = False


def item_tokens(layout: Layout, item: VisualItem) -> Tensor:
    """The item's tokens present in ``layout``, in slot (= ascending token) order."""
    return layout.item_token[item.sample][layout.item[item.sample] == item.index]


def shifted(positions: Tensor, shift: Tensor) -> Tensor:
    """Positions of newly decoded tokens in a layout whose numbering lags the original by ``shift``."""
    return positions - shift.to(positions.dtype)[:, None]


def replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def replace_layer_inputs(
    args: tuple, kwargs: dict, hidden: Tensor, inputs: LayerInputs, layer_type: str
) -> tuple[tuple, dict]:
    args, kwargs = replace_hidden(args, kwargs, hidden)
    kwargs["attention_mask"] = inputs.masks[layer_type]
    kwargs["position_embeddings"] = inputs.position_embeddings[layer_type]
    kwargs["position_ids"] = inputs.position_ids
    return args, kwargs
