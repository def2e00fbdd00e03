"""What one wrapped forward did: kept tokens per stage, sequence lengths per decoder layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class StageRecord:
    """One pruning point of one forward.

    ``kept[b]`` holds the indices (ascending) of sample b's visual tokens that survive this stage, in the sample's
    original visual-token numbering (its images' tokens concatenated in prompt order). ``kept_per_item[i]`` is the
    same per image/frame in that item's own numbering; ``scores_per_item[i]`` the method's scores for the item's
    tokens present at this stage (``None`` for methods that select without scoring). ``merges[i]`` holds, for items
    a merging method changed, a ``Merged`` whose ``indices`` are the item tokens that carry new features (ascending)
    and whose ``features`` are those features in LLM space (and positions, for re-encoded images).
    """

    layer: int | None
    budgets: list[int]
    kept: list[Tensor]
    kept_per_item: list[Tensor]
    scores_per_item: list[Tensor | None]
    merges: dict[int, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return "before the LLM" if self.layer is None else f"decoder layer {self.layer}"


@dataclass
class DecodeDrop:
    """Cached visual tokens a decode stage removed: chosen during decode step ``step`` (1-based) by the attention
    in decoder layer ``layer``, absent from every layer's KV cache from step ``step + 1`` on. ``dropped[b]`` holds
    sample b's dropped tokens in its original visual-token numbering (as ``StageRecord.kept``), ``dropped_per_item[i]``
    the same per image in its own numbering."""

    step: int
    layer: int
    dropped: list[Tensor]
    dropped_per_item: list[Tensor]


@dataclass
class ForwardRecord:
    """The record of one prefill forward of a wrapped model.

    ``seq_lens[l]`` is the (padded) sequence length entering decoder layer l, ``tokens_per_layer[l][b]`` the real
    tokens of sample b there. ``output_index[b, j]`` is the original prompt position of output row j (-1 for
    padding): with pruning the logits cover only the kept tokens. ``overhead`` holds the seconds vtprune itself spent
    ("vision": [CLS] rows and token maps; "observe": sub-layer observers; "select": signals, scores, selection and
    bookkeeping at the stages), host wall time unless ``Pruning.synchronize_timers`` makes it wait for the device.
    """

    items: list[dict] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    input_length: int = 0
    output_index: Tensor | None = None
    budget: str = "final"
    overhead: dict[str, float] = field(default_factory=dict)
    # what the vision tower encoded for this forward: {"views": n} or {"grid": (t, h, w)} per call / image
    encoder_inputs: list[dict[str, Any]] = field(default_factory=list)
    # per item, its patch grids as (token offset, rows, cols, row stride), first the view the tower saw first
    item_grids: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    # visual tokens decode stages removed from the KV cache while generating after this prefill, in step order
    decode_drops: list[DecodeDrop] = field(default_factory=list)
    # visual tokens masking decode stages hid from later layers while generating (DyCoke), per step the stage ran:
    # vtprune.core.engine.decode.DecodeMask (step, layer, first_layer, hidden, hidden_per_item, chosen)
    decode_masks: list[Any] = field(default_factory=list)

    def exit_layers(self) -> list[int | None]:
        """Per sample, the decoder layer from which none of its visual tokens is left (an in-LLM stage kept none:
        DyVTE's exit, ToDRE's ``drop_all``); None where some reach the last layer or the sample has none."""
        exits: list[int | None] = []
        with_items = {item["sample"] for item in self.items}
        for sample in range(len(self.tokens_per_layer[0]) if self.tokens_per_layer else 0):
            exits.append(None)
            for stage in self.stages if sample in with_items else ():
                if stage.layer is not None and sample < len(stage.kept) and stage.kept[sample].numel() == 0:
                    exits[-1] = stage.layer
                    break
        return exits

    def visual_tokens_per_layer(self) -> list[float]:
        """Per sample, its visual tokens (all its images) averaged over the decoder layers: what the LLM attends to,
        layer by layer (comparable between methods that prune before the LLM, in stages, or exit at a layer)."""
        layers = len(self.tokens_per_layer)
        stages = {stage.layer: stage for stage in self.stages}
        averages = []
        for sample in range(len(self.tokens_per_layer[0]) if layers else 0):
            current = sum(item["num_tokens"] for item in self.items if item["sample"] == sample)
            if None in stages:
                current = int(stages[None].kept[sample].numel())
            total = 0
            for layer in range(layers):
                if layer in stages:
                    current = int(stages[layer].kept[sample].numel())
                total += current
            averages.append(total / layers)
        return averages
