"""Running one stage: the method sees each item's view and the signals it asked for, selects, and the runner turns
its selection into the slots to keep and a record. Given a prefill state and signals, it needs no model hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtprune.core.adapter import Adapter
from vtprune.core.attention import gather_rows
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.engine.state import Prefill, item_tokens
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.record import ForwardRecord, StageRecord
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, top_budget
from vtprune.core.signals import PIXELS, mean_attention, rotated_keys, rotated_queries, row_attention


class StageRunner:
    """Applies ``method`` at its stages; replays ``frozen``'s selections instead when it is set."""

    def __init__(self, adapter: Adapter, method: Method, info: ModelInfo, tokenizer: Any = None) -> None:
        self.adapter = adapter
        self.method = method
        self.info = info
        self.tokenizer = tokenizer
        self.frozen: ForwardRecord | None = None

    def run(
        self,
        current: Prefill,
        stage_index: int,
        stage: Stage,
        *,
        hidden: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | None:
        """Select at one stage; returns the slots to keep, or None when nothing is dropped."""
        layout = current.layout
        views = [self.item_view(current, order, item, stage_index, stage) for order, item in enumerate(current.items)]
        method, state = self.method.scorer(stage, current.state)
        ctx = PruneContext(
            signals=self.signals(current, stage, hidden, position_embeddings),
            stage=stage,
            model=self.info,
            layout=layout,
            items=views,
            hidden_states=hidden,
            state=state,
            instruction_ids=current.instruction_ids,
            instruction_embeddings=current.instruction_embeddings,
            embed=self.adapter.vlm.get_input_embeddings(),
            tokenizer=self.tokenizer,
            final_norm=self.adapter.final_norm if stage.layer is not None else None,  # in-LLM stages only
            # tower features are only meaningful before the LLM; the projector maps each row on its own there
            projector=self._project if stage.layer is None and self.info.per_token_projector else None,
        )
        scores: list[Tensor | None] = [None] * len(views)
        current.merges = {}
        if self.frozen is not None:
            selections = replay(self.frozen, stage_index, views)
            # merged features depend on prompt tokens only, so the recorded ones are what a rerun would compute
            current.merges = dict(self.frozen.stages[stage_index].merges)
        elif type(method).select is Method.select:
            scores = method.score(ctx)
            selections = top_budget(views, scores)
        else:
            selections = method.select(ctx)
        for i, (view, chosen) in enumerate(zip(views, selections)):
            if isinstance(chosen, Merged):
                selections[i] = chosen.indices
                current.merges[view.item.index] = self._merged(view, chosen, stage)
        check_selections(self.method.name, views, selections, may_empty=stage.dynamic)

        keep = layout.valid & ~layout.visual
        kept_per_item = []
        for view, chosen in zip(views, selections):
            keep[view.sample, view.slots[chosen]] = True
            keep[view.sample, view.slots[~view.selectable]] = True
            kept_per_item.append(view.tokens[keep[view.sample, view.slots]])
        current.record.stages.append(
            StageRecord(
                layer=stage.layer,
                budgets=[v.budget for v in views],
                kept=kept_per_sample(current.items, kept_per_item, layout.batch_size),
                kept_per_item=kept_per_item,
                scores_per_item=[s.detach().float() if s is not None else None for s in scores],
                merges=dict(current.merges),
            )
        )
        if bool((keep == layout.valid).all()):
            return None
        return keep

    def _merged(self, view: ItemView, chosen: Merged, stage: Stage) -> Merged:
        """A method's merge result in token numbering, ascending, its features in the LLM's input space."""
        order = chosen.indices.argsort()
        merged = chosen.features[order]
        if chosen.space == "encoder":
            merged = self.adapter.project(merged)
        elif chosen.space != "llm":
            raise RuntimeError(f"{self.method.name}: Merged.space must be 'llm' or 'encoder'")
        if chosen.positions is not None and stage.layer is not None:
            raise RuntimeError(f"{self.method.name}: Merged.positions are only allowed before the LLM")
        return Merged(
            view.tokens[chosen.indices[order]],
            merged,
            positions=chosen.positions[order] if chosen.positions is not None else None,
            advance=chosen.advance,
            combined=chosen.combined[order] if chosen.combined is not None else None,
        )

    def item_view(self, current: Prefill, order: int, item: VisualItem, stage_index: int, stage: Stage) -> ItemView:
        layout = current.layout
        slots = (layout.item[item.sample] == item.index).nonzero().squeeze(1)
        tokens = layout.item_token[item.sample, slots]
        selectable = item.selectable_mask(slots.device)[tokens]
        signals = current.vision.get(item.index)
        groups = signals.view.to(slots.device)[tokens] if signals is not None else None
        budgets = current.budgets[item.index][stage_index]
        if stage.modalities is not None and item.modality not in stage.modalities:  # not this stage's business
            budgets = {-1: item.num_tokens}
        if -1 in budgets:  # one budget for the whole item
            group_budgets, budget = None, min(budgets[-1], int(selectable.sum()))
        else:  # one budget per view (per-crop accounting)
            group_budgets = {g: min(b, int((selectable & (groups == g)).sum())) for g, b in budgets.items()}
            budget = sum(group_budgets.values())
        cls_attention = received_attention = vision_maps = pixel_maps = None
        if stage.vision_layers:
            cls_attention = torch.stack([signals.cls_attention[layer] for layer in stage.vision_layers])[:, tokens]
        if stage.vision_received:
            received_attention = torch.stack([signals.received[layer] for layer in stage.vision_received])[:, tokens]
        if stage.vision_maps:
            vision_maps = torch.stack([signals.received[key] for key in stage.vision_maps])[:, tokens]
        if stage.pixel_maps:
            pixel_maps = torch.stack([signals.received[PIXELS, fn] for fn in stage.pixel_maps])[:, tokens]
        replacement, replacement_grid = current.replacements.get(item.index, (None, None))
        # rows of the features the LLM received that hold these tokens
        rows = torch.searchsorted(item_tokens(current.segments[0], item), tokens)
        return ItemView(
            item=item,
            order=order,
            tokens=tokens,
            slots=slots,
            selectable=selectable,
            budget=budget,
            features=current.features[item.index][rows],
            encoder_features=(
                signals.encoder_features[tokens]
                if stage.encoder_features and signals is not None and signals.encoder_features is not None
                else None
            ),
            cls_attention=cls_attention,
            received_attention=received_attention,
            vision_maps=vision_maps,
            pixel_maps=pixel_maps,
            encoder_keys=(
                signals.keys[stage.vision_layers[-1]].to(slots.device)[tokens] if stage.vision_layers else None
            ),
            cls_features=signals.view_cls if stage.encoder_features and signals is not None else None,
            replacement=replacement,
            replacement_grid=replacement_grid,
            tower_tokens=current.tower_tokens.get(item.index),
            groups=groups,
            group_budgets=group_budgets,
            final_budget=final_budget(current.budgets[item.index][-1], item),
        )

    # -- signals -----------------------------------------------------------------------------------------------
    def signals(
        self, current: Prefill, stage: Stage, hidden: Tensor | None, position_embeddings: tuple[Tensor, Tensor] | None
    ) -> Signals:
        """The model signals this stage asked for, computed only when the method reads them."""
        signals = Signals()
        if stage.attention_from is not None:
            signals.attention = lambda: self.attention(current, stage, hidden, position_embeddings)
            signals.attention_of = lambda rows, real: self.attention(
                current, stage, hidden, position_embeddings, (rows, real)
            )
            signals.attention_rows = lambda rows, real, per_head=False: self.attention(
                current, stage, hidden, position_embeddings, (rows, real), per_row=True, per_head=per_head
            )
        if stage.states_from is not None:
            signals.query_states = lambda: self.query_states(current, stage)
            signals.key_states = lambda: self.key_states(current, stage)
        return signals

    def _project(self, features: Tensor) -> Tensor:
        """The adapter's projector, looked up when a method calls it (ctx.project)."""
        return self.adapter.project(features)

    def attention(
        self,
        current: Prefill,
        stage: Stage,
        hidden: Tensor | None,
        position_embeddings: tuple[Tensor, Tensor] | None,
        query: str | tuple[Tensor, Tensor] | None = None,
        per_row: bool = False,
        per_head: bool = False,
    ) -> Tensor:
        """Head-averaged attention of the stage's query rows, recomputed from layer ``attention_from``'s Q/K: averaged
        over the rows, ``[B, L]``, or with ``per_row`` each of the given rows apart, ``[B, R, L]`` (and with
        ``per_head`` each head apart, ``[B, heads, R, L]``)."""
        layout = current.layout
        parts = self.adapter.decoder_parts(stage.attention_from)
        if stage.attention_from == stage.layer:  # this layer's own attention, from its input
            normed = parts.input_norm(hidden)
            keys = parts.key(normed)

            def queries(slots: Tensor) -> Tensor:
                return parts.query(gather_rows(normed, slots))
        else:
            captured = captured_at(current, stage.attention_from, layout)
            keys, position_embeddings = captured["k"], captured["position_embeddings"]

            def queries(slots: Tensor) -> Tensor:
                return gather_rows(captured["q"], slots)
        if per_row:
            rows, real = query
            return row_attention(parts, queries, keys, position_embeddings, layout, rows, real, per_head)
        return mean_attention(parts, queries, keys, position_embeddings, layout, query or stage.query)

    def query_states(self, current: Prefill, stage: Stage) -> Tensor:
        captured = captured_at(current, stage.states_from, current.layout)
        parts = self.adapter.decoder_parts(stage.states_from)
        return rotated_queries(parts, captured["q"], captured["position_embeddings"])

    def key_states(self, current: Prefill, stage: Stage) -> Tensor:
        captured = captured_at(current, stage.states_from, current.layout)
        parts = self.adapter.decoder_parts(stage.states_from)
        return rotated_keys(parts, captured["k"], captured["position_embeddings"])


def final_budget(budgets: dict[int, int], item: VisualItem) -> int:
    """The tokens the item keeps after the schedule's last stage (summed over views for per-view budgets)."""
    return min(item.num_selectable, budgets[-1] if -1 in budgets else sum(budgets.values()))


def captured_at(current: Prefill, layer: int, layout: Layout) -> dict[str, Any]:
    """Layer ``layer``'s queries and keys captured during this prefill, for the current layout."""
    captured = current.captured.get(layer, {})
    if captured.get("layout") is not layout or "q" not in captured or "k" not in captured:
        raise RuntimeError(f"decoder layer {layer}'s queries and keys were not captured for this stage")
    return captured


def kept_per_sample(items: list[VisualItem], kept_per_item: list[Tensor], batch: int) -> list[Tensor]:
    per_sample: list[list[Tensor]] = [[] for _ in range(batch)]
    for item, kept in zip(items, kept_per_item):
        per_sample[item.sample].append(kept + item.visual_offset)
    device = kept_per_item[0].device if kept_per_item else None
    return [
        torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.long, device=device)
        for parts in per_sample
    ]


def check_selections(name: str, views: list[ItemView], selections: list[Tensor], may_empty: bool = False) -> None:
    if len(selections) != len(views):
        raise RuntimeError(f"{name} returned {len(selections)} selections for {len(views)} images")
    for view, chosen in zip(views, selections):
        if chosen.ndim != 1 or chosen.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"{name} must return 1-D integer indices per image, got {chosen.dtype} {chosen.shape}")
        if chosen.numel() > view.budget or (view.budget > 0 and chosen.numel() == 0 and not may_empty):
            raise RuntimeError(f"{name} kept {chosen.numel()} tokens of an image whose budget is {view.budget}")
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= view.num_tokens):
            raise RuntimeError(f"{name} returned indices outside [0, {view.num_tokens})")
        if chosen.unique().numel() != chosen.numel() or not bool(view.selectable[chosen].all()):
            raise RuntimeError(f"{name} returned repeated or structural token indices")


def replay(frozen: ForwardRecord, stage_index: int, views: list[ItemView]) -> list[Tensor]:
    """The selection a frozen record made, mapped onto this forward's tokens."""
    if stage_index >= len(frozen.stages) or len(frozen.stages[stage_index].kept_per_item) != len(views):
        raise ValueError("the frozen selection was recorded on a different batch of images; unfreeze first")
    selections = []
    for view, kept in zip(views, frozen.stages[stage_index].kept_per_item):
        chosen = torch.isin(view.tokens, kept.to(view.tokens.device)) & view.selectable
        selections.append(chosen.nonzero().squeeze(1))
    return selections
