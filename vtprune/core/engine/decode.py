"""Decode steps after a pruned prefill: no re-selection; per segment of layers the prefill's mask plus the new
tokens' columns, and positions lagging the original numbering by the tokens removed before (``Layout.shift``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtprune.core.adapter import Adapter
from vtprune.core.compat import get_cache
from vtprune.core.engine.state import (
    Decode,
    Session,
    layer_inputs,
    replace_layer_inputs,
    shifted,
)


def start_decode(adapter: Adapter, inputs: dict[str, Any], session: Session) -> tuple[Decode, dict[str, Any]]:
    """The decode step's state and the multimodal forward's inputs for the first segment of layers."""
    reference = inputs.get("input_ids")
    if reference is None:
        reference = inputs["inputs_embeds"]
    batch, query_length = reference.shape[:2]
    seen = session.prompt_length + session.decoded
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and attention_mask.ndim == 2:
        if attention_mask.shape[1] != seen + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens but the pruned cache has seen {seen} "
                f"(prompt {session.prompt_length} + {session.decoded} decoded) and {query_length} are new; pass "
                "the mask of the whole sequence so far, as generate() does"
            )
        new_columns = attention_mask[:, session.prompt_length :]
    else:
        new_columns = torch.ones(batch, seen - session.prompt_length + query_length, device=reference.device)
    positions = inputs.get("position_ids")
    if positions is None:
        positions = adapter.decode_positions(inputs, seen, query_length, batch)
    elif not adapter.mrope:
        positions = positions.expand(batch, -1)
    base = session.segments[0]
    inputs["attention_mask"] = torch.cat([base.valid.to(new_columns.dtype), new_columns], dim=1)
    inputs["position_ids"] = shifted(positions, base.shift)
    current = Decode(
        layout=base,
        cache=get_cache(inputs),
        session=session,
        new_columns=new_columns,
        positions=positions,
        query_length=query_length,
    )
    return current, inputs


def decode_layer(
    adapter: Adapter, current: Decode, index: int, hidden: Tensor, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Decoder layer ``index``'s inputs in this step: its segment's mask and positions (None: the first segment's,
    which the model built itself)."""
    segment = current.session.segment_of(index)
    if segment == 0:
        return None
    if segment not in current.segment_inputs:
        layout = current.session.segments[segment]
        mask = torch.cat([layout.valid.to(current.new_columns.dtype), current.new_columns], dim=1)
        positions = shifted(current.positions, layout.shift)
        current.segment_inputs[segment] = layer_inputs(adapter, hidden, current.cache, mask, positions, index)
    layer_type = adapter.layer_types()[index]
    return replace_layer_inputs(args, kwargs, hidden, current.segment_inputs[segment], layer_type)
