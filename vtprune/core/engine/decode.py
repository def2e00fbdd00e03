"""Decode steps after a pruned prefill, and decode-time drops of cached visual tokens.

Decode steps: no re-selection; per segment of layers the prefill's mask plus the new tokens' columns, and
positions lagging the original numbering by the tokens removed before (``Layout.shift``).

Decode-time drops (:class:`~vtprune.core.registry.DecodeStage`, declared by ``Method.decode_stages``; MustDrop's
output-aware cache policy, DyCoke's decode-time KV pruning):

* during decode step ``t`` (1-based), at the pre-hook of a stage's layer, :func:`decode_attention` recomputes the
  head-averaged attention of the step's newest token in that layer: its query (from the layer's input, after q-norm
  and RoPE) against the layer's cached keys and the step's own keys, masked like the layer (padding, the new tokens'
  columns), so the model keeps running with SDPA / FlashAttention;
* the method ranks each image's cached tokens from it (``Method.decode_score`` with a :class:`PruneContext` whose
  ``layout`` is that layer's cached prompt slots and ``step`` the step); each image keeps ``ceil(keep * n)`` of its
  ``n`` cached selectable tokens, the others are recorded (``ForwardRecord.decode_drops``, original numbering);
* before step ``t + 1`` (:func:`start_decode`) the dropped tokens leave the KV cache of every layer that still holds
  them (:func:`vtprune.kernels.compact_kv`, re-padded on the padding side) and each segment's layout is compacted
  the same way (``Layout.compact`` without renumbering), so masks (``Layout.valid``) follow and the positions of
  later tokens stay in the original numbering, as FastV's drops do. Every later step then sees exactly the cache a
  no-cache recomputation would use if the dropped tokens' columns were masked for the rows from step ``t + 1`` on.

Decode-time masks (a stage with ``mask_from=M``, DyCoke's decode-time KV pruning): the same attention and ranking
during step ``t``, but nothing leaves the cache: from decoder layer ``M`` on, this step's (and, until the stage
chooses again, later steps') newest token attends only to each image's selected cached tokens and to the text; the
cached tokens that are not selected are masked columns of those layers' attention (:func:`masked_slots`). The choice
can change from step to step; ``decode_score`` may return ``None`` for an item (no new choice: keep the previous
one, or unmask the item for the step without ``DecodeStage.reuse``). ``ForwardRecord.decode_masks`` lists, per step
the stage ran, the tokens hidden (:class:`DecodeMask`). Every step then equals a no-cache recomputation whose row of
step ``t`` has, in layers ``M ..``, the columns its record names masked.

Decode drops compact every layer's cache, so they need dynamic caches of full-attention layers that hold every
token they saw (sliding-window or linear-attention layer types are refused by :func:`checked_decode_stages`; a
sliding cache whose window has filled raises at the drop). They are made per row: beam search, which reorders cache
rows between steps, raises once drops have made rows differ (:func:`guard_reordering`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtprune.core.adapter import Adapter
from vtprune.core.compat import get_cache
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.engine.stages import check_selections
from vtprune.core.engine.state import (
    Decode,
    DecodePolicy,
    Session,
    layer_inputs,
    replace_layer_inputs,
    shifted,
)
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.record import DecodeDrop, ForwardRecord
from vtprune.core.registry import DecodeStage, Method, ModelInfo, Stage, top_budget
from vtprune.core.signals import rotated_keys, rotated_queries
from vtprune.kernels import compact_kv


@dataclass
class DecodeMask:
    """Cached visual tokens a masking decode stage hid: during decode step ``step`` (1-based) the newest token's
    attention in decoder layer ``layer`` chose, and in layers ``first_layer ..`` the token of this step (and of the
    later steps until the stage's next record) did not attend to them; they stay cached. ``hidden[b]`` holds sample
    b's hidden tokens in its original visual-token numbering (as ``StageRecord.kept``), ``hidden_per_item[i]`` the
    same per image in its own numbering, ``chosen[i]`` whether the stage chose item i anew at this step (False: the
    previous choice was reused, or the item is unmasked)."""

    step: int
    layer: int
    first_layer: int
    hidden: list[Tensor]
    hidden_per_item: list[Tensor]
    chosen: list[bool]


def decode_masks(record: ForwardRecord) -> list[DecodeMask]:
    """``record.decode_masks`` (created on records of a ``ForwardRecord`` without that field)."""
    return record.__dict__.setdefault("decode_masks", [])


def policy_masks(policy: DecodePolicy) -> dict[int, dict[int, Tensor]]:
    """Per masking stage (its index in ``policy.stages``), per item index: the item's hidden tokens (own numbering)."""
    return policy.__dict__.setdefault("masks", {})


def checked_decode_stages(method: Method, stages: list[DecodeStage], info: ModelInfo) -> list[DecodeStage]:
    """A method's decode stages, with clear errors for layers, budgets or models they cannot apply to."""
    for stage in stages:
        info.check_layer(method.name, "decode stage layer", stage.layer)
        if not 0 < stage.keep <= 1:
            raise ValueError(f"{method.name}: a decode stage's keep must lie in (0, 1], got {stage.keep}")
        if isinstance(stage.every, bool) or not isinstance(stage.every, int) or stage.every < 0:
            raise ValueError(f"{method.name}: a decode stage's every must be an int >= 0, got {stage.every!r}")
        if stage.mask_from is not None:
            info.check_layer(method.name, "decode stage mask_from", stage.mask_from, minimum=stage.layer + 1)
    other = sorted({t for t in info.layer_types if t != "full_attention"})
    if stages and other:
        what = (
            "decode-time drops remove cached tokens from every decoder layer's KV cache"
            if any(stage.evicts for stage in stages)
            else "decode-time masks hide cached tokens from the attention of later decoder layers"
        )
        raise ValueError(
            f"{method.name}: {what}, but {info.family_name or info.family} has {', '.join(other)} layers, whose "
            "caches hold other states"
        )
    return stages


def decode_policy(
    method: Method,
    stages: list[DecodeStage],
    info: ModelInfo,
    items: list[VisualItem],
    record: ForwardRecord,
    frozen: ForwardRecord | None,
    state: dict,
) -> DecodePolicy | None:
    """The decode stages' state for the generation after this prefill (None when there are none or no images);
    ``state`` is the prefill's (what the method's ``observe()`` and stages wrote), its decode contexts' ``state``."""
    if not stages or not items:
        return None
    return DecodePolicy(method, stages, info, items, record, frozen, state)


def earlier_cache_cut(stages: list[Stage], record: ForwardRecord, items: list[VisualItem]) -> DecodeDrop | None:
    """What the in-LLM stages marked ``earlier_caches`` dropped, as one decode drop of step 0 (None when nothing):
    removed from the caches of the layers before them before the first decode step, as a decode drop is."""
    cut = [torch.empty(0, dtype=torch.long) for _ in items]
    for index, (stage, stage_record) in enumerate(zip(stages, record.stages)):
        if not stage.earlier_caches or stage.layer is None:
            continue
        for i, item in enumerate(items):
            after = stage_record.kept_per_item[i]
            before = (
                record.stages[index - 1].kept_per_item[i]
                if index
                else torch.arange(item.num_tokens, device=after.device)
            )
            gone = before[~torch.isin(before, after)]
            cut[i] = torch.cat([cut[i].to(gone.device), gone]).unique()
    if not any(gone.numel() for gone in cut):
        return None
    samples = max((item.sample for item in items), default=-1) + 1
    per_sample: list[list[Tensor]] = [[] for _ in range(samples)]
    for item, gone in zip(items, cut):
        per_sample[item.sample].append(gone + item.visual_offset)
    empty = cut[0].new_empty(0)
    return DecodeDrop(
        step=0,
        layer=min(s.layer for s in stages if s.earlier_caches and s.layer is not None),
        dropped=[torch.cat(parts).sort().values if parts else empty for parts in per_sample],
        dropped_per_item=[gone.sort().values for gone in cut],
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
    cache = get_cache(inputs)
    step = 0
    if session.policy is not None:
        guard_reordering(session.policy, cache)
        apply_drops(session, cache)  # what the previous step's decode stages chose
        session.policy.steps += 1
        step = session.policy.steps
    base = session.segments[0]
    inputs["attention_mask"] = torch.cat([base.valid.to(new_columns.dtype), new_columns], dim=1)
    inputs["position_ids"] = shifted(positions, base.shift)
    current = Decode(
        layout=base,
        cache=cache,
        session=session,
        new_columns=new_columns,
        positions=positions,
        query_length=query_length,
        step=step,
    )
    return current, inputs


def decode_layer(
    adapter: Adapter, current: Decode, index: int, hidden: Tensor, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Decoder layer ``index``'s inputs in this step: its segment's mask and positions (None: the first segment's,
    which the model built itself), with the columns of masking decode stages hidden; runs the decode stages at this
    layer (before masking it: a stage reads a layer below the ones it masks)."""
    session = current.session
    segment = session.segment_of(index)
    layer_type = adapter.layer_types()[index]
    replaced = None
    if segment != 0:
        if segment not in current.segment_inputs:
            layout = session.segments[segment]
            mask = torch.cat([layout.valid.to(current.new_columns.dtype), current.new_columns], dim=1)
            positions = shifted(current.positions, layout.shift)
            current.segment_inputs[segment] = layer_inputs(adapter, hidden, current.cache, mask, positions, index)
        replaced = replace_layer_inputs(args, kwargs, hidden, current.segment_inputs[segment], layer_type)
    policy = session.policy
    if policy is None:
        return replaced
    for order, stage in enumerate(policy.stages):
        if stage.layer == index and stage.due(current.step):
            position_embeddings = (replaced[1] if replaced is not None else kwargs)["position_embeddings"]
            run_decode_stage(adapter, current, policy, stage, hidden, position_embeddings, order)
    active = tuple(
        order
        for order, stage in enumerate(policy.stages)
        if stage.mask_from is not None and stage.mask_from <= index and policy_masks(policy).get(order)
    )
    if not active:
        return replaced
    key = ("masked", segment, active)  # per step, per segment and set of masking stages in effect
    if key not in current.segment_inputs:
        layout = session.segments[segment]
        hidden_slots = masked_slots(layout, policy, active)
        valid = layout.valid & ~hidden_slots
        mask = torch.cat([valid.to(current.new_columns.dtype), current.new_columns], dim=1)
        positions = shifted(current.positions, layout.shift)
        current.segment_inputs[key] = layer_inputs(adapter, hidden, current.cache, mask, positions, index)
    return replace_layer_inputs(args, kwargs, hidden, current.segment_inputs[key], layer_type)


def masked_slots(layout: Layout, policy: DecodePolicy, stages: tuple[int, ...]) -> Tensor:
    """``[B, layout.length]``: the cached slots the masking stages ``stages`` (indices into ``policy.stages``)
    hide now."""
    gone = torch.zeros_like(layout.valid)
    masks = policy_masks(policy)
    for order in stages:
        for item in policy.items:
            tokens = masks.get(order, {}).get(item.index)
            if tokens is None or tokens.numel() == 0:
                continue
            row = item.sample
            gone[row] |= (layout.item[row] == item.index) & torch.isin(layout.item_token[row], tokens)
    return gone & layout.valid


# -- decode-time drops -----------------------------------------------------------------------------------------
def decode_attention(
    adapter: Adapter,
    current: Decode,
    layer: int,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    layout: Layout,
    hidden_slots: Tensor | None = None,
) -> Tensor:
    """Head-averaged attention of the step's newest token in decoder layer ``layer`` over the layer's cached prompt
    slots (``layout``), ``[B, layout.length]`` (fp32); its softmax also spans the decoded tokens and the step's own.
    ``hidden_slots``: slots the layer does not attend to this step (masking decode stages), zero here too."""
    parts = adapter.decoder_parts(layer)
    cached = cache_layer(current.cache, layer)
    normed = parts.input_norm(hidden)
    cos, sin = position_embeddings
    query = rotated_queries(parts, parts.query(normed[:, -1:]), (cos[:, -1:], sin[:, -1:]))  # [B, 1, heads, d]
    own = rotated_keys(parts, parts.key(normed), position_embeddings)  # [B, q, kv_heads, d]
    keys = torch.cat([cached.keys.float(), own.transpose(1, 2).float()], dim=2)  # [B, kv_heads, N, d]
    q = query.transpose(1, 2).float()
    if q.shape[1] != keys.shape[1]:  # grouped KV heads
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * parts.attention.scaling  # [B, heads, 1, N]
    softcap = getattr(parts.attention, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    prompt = layout.valid if hidden_slots is None else layout.valid & ~hidden_slots
    valid = torch.cat([prompt, current.new_columns.bool()], dim=1)
    if valid.shape[1] != keys.shape[2]:
        raise RuntimeError(
            f"decoder layer {layer}'s cache holds {keys.shape[2] - hidden.shape[1]} tokens but its layout expects "
            f"{valid.shape[1] - hidden.shape[1]}"
        )
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)[:, 0]
    return probs[:, : layout.length]


def decode_context(
    policy: DecodePolicy, stage: DecodeStage, layout: Layout, views: list[ItemView], step: int, attention: Tensor
) -> tuple[Method, PruneContext]:
    """The method that ranks at ``stage`` (a composition's part) and its context: the cached views, the part's own
    state and the step's newest token's ``attention`` over the cached slots."""
    scoring = Stage(layer=stage.layer, attention_from=stage.layer, part=stage.part)
    scorer, state = policy.method.scorer(scoring, policy.state)
    ctx = PruneContext(
        stage=scoring,
        model=policy.info,
        layout=layout,
        items=views,
        state=state,
        step=step,
        signals=Signals(attention=lambda: attention),
    )
    return scorer, ctx


def run_decode_stage(
    adapter: Adapter,
    current: Decode,
    policy: DecodePolicy,
    stage: DecodeStage,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    order: int = 0,
) -> None:
    """Rank each image's cached tokens at ``stage`` (or replay a frozen record) and note the drops for the next step
    (eviction) or the tokens later layers hide from now on (masking; ``order``: the stage's index in the policy)."""
    if not stage.evicts:
        run_mask_stage(adapter, current, policy, stage, hidden, position_embeddings, order)
        return
    session = current.session
    layout = session.segments[session.segment_of(stage.layer)]
    views = cached_views(layout, policy.items, stage.keep)
    if not views:
        return
    frozen = replayed_drops(policy.frozen, current.step, stage.layer) if policy.frozen is not None else None
    if frozen is not None:
        dropped = [frozen.dropped_per_item[view.order].to(view.tokens.device) for view in views]
    else:
        attention = decode_attention(adapter, current, stage.layer, hidden, position_embeddings, layout)
        scorer, ctx = decode_context(policy, stage, layout, views, current.step, attention)
        selections = top_budget(views, scorer.decode_score(ctx))
        check_selections(scorer.name, views, selections)
        dropped = []
        for view, chosen in zip(views, selections):
            gone = view.selectable.clone()
            gone[chosen] = False
            dropped.append(view.tokens[gone])
    per_sample: list[list[Tensor]] = [[] for _ in range(layout.batch_size)]
    for view, gone in zip(views, dropped):
        per_sample[view.sample].append(gone + view.item.visual_offset)
        earlier = policy.pending.get(view.item.index)
        policy.pending[view.item.index] = gone if earlier is None else torch.cat([earlier, gone]).unique()
    empty = layout.token.new_empty(0)
    policy.record.decode_drops.append(
        DecodeDrop(
            step=current.step,
            layer=stage.layer,
            dropped=[torch.cat(parts).sort().values if parts else empty for parts in per_sample],
            dropped_per_item=[gone.sort().values for gone in dropped],
        )
    )


def run_mask_stage(
    adapter: Adapter,
    current: Decode,
    policy: DecodePolicy,
    stage: DecodeStage,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    order: int,
) -> None:
    """A masking stage during step ``current.step``: choose (or replay, or reuse) each image's kept cached tokens;
    the others are hidden from layers ``stage.mask_from ..`` from this step on, until the stage chooses again."""
    session = current.session
    layout = session.segments[session.segment_of(stage.layer)]
    views = cached_views(layout, policy.items, stage.keep)
    if not views:
        return
    masks = policy_masks(policy)
    previous = masks.get(order, {})
    chosen = [False] * len(views)
    frozen = replayed_masks(policy.frozen, current.step, stage.layer) if policy.frozen is not None else None
    if frozen is not None:
        hidden_tokens = [frozen.hidden_per_item[view.order].to(view.tokens.device) for view in views]
        chosen = list(frozen.chosen)
    else:
        others = tuple(
            i
            for i, other in enumerate(policy.stages)
            if other.mask_from is not None and other.mask_from <= stage.layer and masks.get(i)
        )
        hidden_slots = masked_slots(layout, policy, others) if others else None
        attention = decode_attention(adapter, current, stage.layer, hidden, position_embeddings, layout, hidden_slots)
        scorer, ctx = decode_context(policy, stage, layout, views, current.step, attention)
        scores = scorer.decode_score(ctx)
        if len(scores) != len(views):
            raise ValueError(f"{scorer.name}: decode_score gave {len(scores)} scores for {len(views)} items")
        fresh = [i for i, score in enumerate(scores) if score is not None]
        selections = dict(zip(fresh, top_budget([views[i] for i in fresh], [scores[i] for i in fresh])))
        check_selections(scorer.name, [views[i] for i in fresh], list(selections.values()))
        empty = layout.token.new_empty(0)
        hidden_tokens = []
        for i, view in enumerate(views):
            if i in selections:
                gone = view.selectable.clone()
                gone[selections[i]] = False
                hidden_tokens.append(view.tokens[gone])
                chosen[i] = True
            elif stage.reuse:
                hidden_tokens.append(previous.get(view.item.index, empty))
            else:
                hidden_tokens.append(empty)
    masks[order] = {view.item.index: gone for view, gone in zip(views, hidden_tokens)}
    per_sample: list[list[Tensor]] = [[] for _ in range(layout.batch_size)]
    for view, gone in zip(views, hidden_tokens):
        per_sample[view.sample].append(gone + view.item.visual_offset)
    empty = layout.token.new_empty(0)
    decode_masks(policy.record).append(
        DecodeMask(
            step=current.step,
            layer=stage.layer,
            first_layer=stage.mask_from,
            hidden=[torch.cat(parts).sort().values if parts else empty for parts in per_sample],
            hidden_per_item=[gone.sort().values for gone in hidden_tokens],
            chosen=chosen,
        )
    )


def replayed_masks(frozen: ForwardRecord, step: int, layer: int) -> DecodeMask | None:
    for mask in decode_masks(frozen):
        if mask.step == step and mask.layer == layer:
            return mask
    return None


def cached_views(layout: Layout, items: list[VisualItem], keep: float) -> list[ItemView]:
    """Each image's cached tokens in ``layout`` as the view a decode stage ranks, budget ``ceil(keep * n)``."""
    views = []
    for order, item in enumerate(items):
        slots = (layout.item[item.sample] == item.index).nonzero().squeeze(1)
        tokens = layout.item_token[item.sample, slots]
        selectable = item.selectable_mask(slots.device)[tokens]
        count = int(selectable.sum())
        budget = min(count, max(1, math.ceil(keep * count - 1e-9))) if count else 0
        views.append(ItemView(item, order, tokens, slots, selectable, budget))
    return views


def replayed_drops(frozen: ForwardRecord, step: int, layer: int) -> DecodeDrop | None:
    for drop in frozen.decode_drops:
        if drop.step == step and drop.layer == layer:
            return drop
    return None


def cache_layer(cache: Any, layer: int) -> Any:
    """Decoder layer ``layer``'s cache, which decode drops compact: a dynamic layer holding every token it saw (a
    sliding-window layer whose window has not filled yet, e.g. Mistral's 4096 on shorter sequences, holds them all)."""
    layers = getattr(cache, "layers", None)
    held = layers[layer] if layers is not None and layer < len(layers) else None
    kind = type(held).__name__ if held is not None else type(cache).__name__
    if kind == "DynamicSlidingWindowLayer" and held.cumulative_length == held.keys.shape[-2]:
        return held
    if kind != "DynamicLayer":
        raise RuntimeError(
            f"decode-time drops need a dynamic cache holding every token of decoder layer {layer}, got {kind}"
            + (" whose sliding window has filled" if kind == "DynamicSlidingWindowLayer" else "")
        )
    return held


def guard_reordering(policy: DecodePolicy, cache: Any) -> None:
    """Beam search reorders the cache's rows between steps; once decode drops have made rows of one prompt differ,
    the layouts would no longer match their rows: refuse then, clearly, instead of decoding with wrong masks."""
    if getattr(cache, "_vtprune_guarded", False):
        return
    reorder = cache.reorder_cache

    def reorder_cache(beam_idx: Tensor) -> None:
        identity = torch.equal(beam_idx.cpu(), torch.arange(beam_idx.numel()))
        differ = any(bool(gone.numel()) for drop in policy.record.decode_drops for gone in drop.dropped) or any(
            bool(gone.numel()) for mask in decode_masks(policy.record) for gone in mask.hidden
        )
        if not identity and differ:
            raise RuntimeError(
                f"{policy.method.name}: decode-time drops and masks are made per row and do not follow beam search's "
                "reordering of the cache; generate with num_beams=1, or turn the method's decode drops off"
            )
        reorder(beam_idx)

    cache.reorder_cache = reorder_cache  # this generation's cache only
    cache._vtprune_guarded = True


def apply_drops(session: Session, cache: Any) -> None:
    """Remove the pending dropped tokens from every layer's cache and compact each segment's layout the same way."""
    policy = session.policy
    if policy is None or not policy.pending:
        return
    pending, policy.pending = policy.pending, {}
    bounds = [layout.first_layer for layout in session.segments[1:]] + [len(cache.layers)]
    for index, layout in enumerate(session.segments):
        gone = torch.zeros_like(layout.valid)
        for item in policy.items:
            tokens = pending.get(item.index)
            if tokens is None or tokens.numel() == 0:
                continue
            row = item.sample
            gone[row] |= (layout.item[row] == item.index) & torch.isin(layout.item_token[row], tokens)
        if not bool(gone.any()):
            continue
        shorter = layout.compact(layout.valid & ~gone, renumber=False, first_layer=layout.first_layer)
        decoded = torch.arange(session.decoded, device=layout.valid.device) + layout.length
        index_rows = torch.cat([shorter.source, decoded.expand(layout.batch_size, -1)], dim=1)
        for layer in range(layout.first_layer, bounds[index]):
            cached = cache_layer(cache, layer)
            cached.keys = compact_kv(cached.keys, index_rows, check=False)
            cached.values = compact_kv(cached.values, index_rows, check=False)
            if hasattr(cached, "cumulative_length"):  # a sliding layer counts what it holds (see cache_layer)
                cached.cumulative_length = cached.keys.shape[-2]
        session.segments[index] = shorter
