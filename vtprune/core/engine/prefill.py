"""Planning a prefill: map the encoder's outputs onto the prompt's placeholders (items), lay out every slot, give
each item its budgets, and, for a pre-LLM stage, hand the model a shorter prompt with the kept features."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk
from vtprune.core.budget import stage_budgets
from vtprune.core.compat import get_cache, set_cache
from vtprune.core.engine.observer import Encoded, VisionObserver
from vtprune.core.engine.stages import StageRunner
from vtprune.core.engine.state import Prefill, Schedule, item_tokens
from vtprune.core.layout import Layout, VisualItem, padding_side_of
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import Merged, Stage
from vtprune.core.signals import ImageSignals, query_slots
from vtprune.kernels import gather_tokens

# Per-token inputs of the multimodal forward that must follow the tokens when a pre-LLM stage shortens the prompt.
PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


class PrefillPlanner:
    """Turns the multimodal forward's inputs into a :class:`Prefill` and the inputs the model then runs on."""

    def __init__(
        self,
        adapter: Adapter,
        observer: VisionObserver,
        runner: StageRunner,
        schedule: Schedule,
        timed: Callable[[dict[str, float], str], AbstractContextManager[None]],
    ) -> None:
        self.adapter = adapter
        self.observer = observer
        self.runner = runner
        self.schedule = schedule
        self.timed = timed
        self.wants_text = any(s.text_embeddings for s in schedule.stages)
        self._warned_whole = False

    def start(self, inputs: dict[str, Any]) -> tuple[Prefill, dict[str, Any]] | None:
        """The prefill state and the inputs to run on; None when there is nothing to prune (no image)."""
        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return None
        chunks = self.adapter.encode(inputs)
        if self.schedule.budget_unit == "video":
            chunks = [join_frames(chunk) for chunk in chunks]
        if not chunks:
            self.observer.take_tower_inputs()
            return None  # text-only batch
        notes = [self.observer.lookup_chunk(chunk) for chunk in chunks]
        replaced = _take_resampled(chunks, notes)
        batch, length = reference.shape[:2]
        device = reference.device
        cache = self._cache(inputs)

        placeholders = self.adapter.placeholder_masks(input_ids, embeds, inputs.get("mm_token_type_ids"))
        items, chunk_items, item_of_slot, token_of_slot, features = assign_items(chunks, placeholders)
        attention_mask = inputs.get("attention_mask")
        valid = (
            attention_mask.bool()
            if attention_mask is not None and attention_mask.ndim == 2
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        layout = Layout(
            token=torch.arange(length, device=device).expand(batch, -1),
            valid=valid,
            item=item_of_slot,
            item_token=token_of_slot,
            positions=self.adapter.prefill_positions(inputs, batch, length),
            shift=torch.zeros(batch, dtype=torch.long, device=device),
            first_layer=0,
            padding_side=padding_side_of(attention_mask),
            blocks=self.adapter.bidirectional_blocks(inputs, item_of_slot >= 0),
        )
        record = ForwardRecord(
            items=[
                {"sample": i.sample, "modality": i.modality, "num_tokens": i.num_tokens}
                | ({"frames": list(i.frames)} if i.frames else {})
                for i in items
            ],
            item_grids=[[(g.offset, g.height, g.width, g.row_stride) for g in i.grids] for i in items],
            input_length=length,
            budget=self.schedule.budget,
        )
        if self.observer.active:
            record.overhead["vision"] = self.observer.take_seconds()
        record.encoder_inputs = self.observer.take_tower_inputs()
        current = Prefill(
            layout=layout,
            cache=cache,
            record=record,
            items=items,
            features=features,
            # a re-encoded image's signals describe its smaller grid, not the placeholders: none for those
            vision=self._item_vision(chunks, chunk_items, [None if i in replaced else n for i, n in enumerate(notes)]),
            pending=list(enumerate(self.schedule.stages)),
            segments=[layout],
        )
        current.budgets = {item.index: self._item_budgets(item, current.vision.get(item.index)) for item in items}
        self._warn_whole(items)
        current.replacements = {chunk_items[i][0]: value for i, value in replaced.items()}
        current.tower_tokens = {
            chunk_items[i][0]: note.tower_tokens
            for i, note in enumerate(notes)
            if note is not None and note.tower_tokens is not None
        }
        if self.wants_text:
            current.instruction_ids, current.instruction_embeddings = self._instruction(input_ids, embeds, layout)
        if current.pending and current.pending[0][1].layer is None:
            inputs = self._pre_llm_stage(current, inputs)
        inputs["mm_encoder_outputs"] = self.adapter.encoder_outputs(
            features_by_chunk(chunks, chunk_items, current.features),
            extras_by_chunk(chunks, chunk_items, current.items, current.layout),
        )
        for key in self.adapter.raw_visual_inputs:
            inputs[key] = None
        inputs["position_ids"] = current.layout.positions
        set_cache(inputs, cache, self.adapter.cache_parameter)
        return current, inputs

    def renumbers(self, stage: Stage) -> bool:
        """Whether pruning at ``stage`` closes the position gaps (M-RoPE families keep their 3-D ids)."""
        return (stage.positions or self.runner.method.positions) == "renumber" and not self.adapter.mrope

    def _pre_llm_stage(self, current: Prefill, inputs: dict[str, Any]) -> dict[str, Any]:
        stage_index, stage = current.pending.pop(0)
        items, features = current.items, current.features
        with self.timed(current.record.overhead, "select"):
            keep = self.runner.run(current, stage_index, stage)
        if keep is not None:
            shorter = current.layout.compact(keep, renumber=self.renumbers(stage), first_layer=0)
            inputs = self._shorten_prompt(inputs, shorter)
            current.features = {item.index: features[item.index][item_tokens(shorter, item)] for item in items}
            current.layout = shorter
        for item_index, merge in current.merges.items():
            rows = torch.searchsorted(item_tokens(current.layout, items[item_index]), merge.indices)
            current.features[item_index] = current.features[item_index].clone()
            current.features[item_index][rows] = merge.features.to(current.features[item_index].dtype)
        current.layout = _override_positions(current.layout, items, current.merges)
        current.segments = [current.layout]
        return inputs

    def _item_vision(
        self, chunks: list[VisualChunk], chunk_items: list[list[int]], notes: list[Encoded | None]
    ) -> dict[int, ImageSignals]:
        """Tower signals of each item, from the observed encoder call that produced its chunk."""
        if not self.observer.active:
            return {}
        vision = {}
        for chunk, item_ids, note in zip(chunks, chunk_items, notes):
            signals = note.signals if note is not None else None
            for spec, item_id in zip(chunk.items, item_ids):
                if signals is not None:
                    vision[item_id] = signals.rows(spec.start, spec.count)
                elif self.observer.tower_signals and note is None:
                    raise ValueError(
                        f"{self.runner.method.name} needs the vision tower's signals of every image, but this "
                        f"{chunk.modality} was encoded outside the wrapped model (precomputed mm_encoder_outputs); "
                        "pass pixel_values instead"
                    )
                elif self.observer.tower_signals:
                    raise ValueError(
                        f"{self.runner.method.name} needs the vision tower's signals per token, which "
                        f"{self.adapter.display_name} cannot align with this {chunk.modality}'s tokens"
                    )
        return vision

    def _warn_whole(self, items: list[VisualItem]) -> None:
        """Once per wrap: an int budget at or above an image's tokens prunes nothing there (pruning would look free)."""
        keep = self.schedule.keep
        whole = [item for item in items if isinstance(keep, int) and keep >= item.num_selectable]
        if whole and not self._warned_whole:
            self._warned_whole = True
            sizes = sorted({item.num_selectable for item in whole})
            kinds = {item.modality for item in items}
            # name what the batch holds: a frame-budgeted video is one item per frame
            noun = "images" if kinds == {"image"} else "videos" if kinds == {"video"} else "images and videos"
            if "video" in kinds and any(item.modality == "video" and not item.frames for item in items):
                noun = noun.replace("videos", "video frames")
            warnings.warn(
                f"keep={keep} is at least the {', '.join(map(str, sizes))} tokens of {len(whole)} of the "
                f"{len(items)} {noun} in this batch: those reach the LLM whole (the record's stage budgets say what "
                "each kept); pass a smaller keep, or a fraction such as keep=0.25",
                stacklevel=2,
            )

    def _item_budgets(self, item: VisualItem, signals: ImageSignals | None) -> list[dict[int, int]]:
        """Per stage, the budget of each group of the item's tokens: {-1: n} for the whole item, or one per view."""
        stages, keep, budget = self.schedule.stages, self.schedule.keep, self.schedule.budget
        specs = [(stage.layer, stage.scale) for stage in stages]
        layers = self.schedule.info.num_layers
        whole = stage_budgets(keep, item.num_selectable, specs, layers, budget)
        for i, stage in enumerate(stages):
            if stage.budget_rule is not None:  # the method's own count (EVS: vLLM's, frame 0 whole)
                # a composed part's own budget (its stages are scaled from the final one)
                part_keep = keep * stage.scale if isinstance(keep, float) else round(keep * stage.scale)
                whole[i] = min(item.num_selectable, max(0, int(stage.budget_rule(part_keep, item))))
        per_view: dict[int, list[int]] = {}
        # a whole video's budget is the video's (its frames are not crops, even where the tower sees them as views)
        if signals is not None and any(stage.per_crop for stage in stages) and not item.frames:
            views = signals.view[item.selectable_mask(signals.view.device)]
            for view, count in zip(*torch.unique(views, return_counts=True)):
                if int(view) >= 0:
                    per_view[int(view)] = stage_budgets(keep, int(count), specs, layers, budget)
        return [
            {view: counts[i] for view, counts in per_view.items()} if stage.per_crop and per_view else {-1: whole[i]}
            for i, stage in enumerate(stages)
        ]

    def _instruction(
        self, input_ids: Tensor | None, embeds: Tensor | None, layout: Layout
    ) -> tuple[list[Tensor] | None, list[Tensor]]:
        """Per sample: ids and input embeddings of the instruction (the real text after its last image)."""
        rows, row_valid = query_slots(layout, "instruction")
        ids, vectors = [], []
        for sample in range(layout.batch_size):
            slots = rows[sample][row_valid[sample]]
            if input_ids is not None:
                ids.append(input_ids[sample, slots])
                vectors.append(self.adapter.vlm.get_input_embeddings()(ids[-1]))
            else:
                vectors.append(embeds[sample, slots])
        return (ids if input_ids is not None else None), vectors

    def _cache(self, inputs: dict[str, Any]) -> Cache | None:
        cache = get_cache(inputs)
        use_cache = inputs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.text_config, "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.adapter.text_config)
        if cache is not None and (not isinstance(cache, DynamicCache) or cache.is_compileable):
            raise ValueError(
                f"vtprune needs a DynamicCache (layers after a pruning point hold fewer tokens), got "
                f"{type(cache).__name__}; use generate(..., cache_implementation='dynamic') or pass DynamicCache()"
            )
        return cache

    def _shorten_prompt(self, inputs: dict[str, Any], shorter: Layout) -> dict[str, Any]:
        index, pad = shorter.source.clamp(min=0), shorter.source < 0
        inputs = dict(inputs)
        if inputs.get("input_ids") is not None:
            inputs["input_ids"] = inputs["input_ids"].gather(1, index).masked_fill(pad, self.adapter.safe_pad_id())
        else:
            inputs["inputs_embeds"] = gather_tokens(inputs["inputs_embeds"], index, check=False)
        mask = inputs.get("attention_mask")
        inputs["attention_mask"] = shorter.valid.to(mask.dtype if mask is not None else torch.long)
        for key in PER_TOKEN_INPUTS:
            if isinstance(inputs.get(key), Tensor) and inputs[key].ndim == 2:
                inputs[key] = inputs[key].gather(1, index).masked_fill(pad, 0)
        return inputs


def _take_resampled(chunks: list[VisualChunk], notes: list[Encoded | None]) -> dict[int, tuple[Tensor, tuple[int, int]]]:
    """Chunks whose image was re-encoded smaller: set their new features aside, by chunk, and give the chunk
    placeholder-sized stand-ins so its tokens still map onto the prompt's placeholders."""
    replaced = {}
    for index, (chunk, note) in enumerate(zip(chunks, notes)):
        if note is None or note.resampled_grid is None:
            continue
        replaced[index] = (chunk.features, note.resampled_grid)
        count = sum(spec.count for spec in chunk.items)
        chunk.features = chunk.features.new_zeros(count, chunk.features.shape[-1])
    return replaced


def _override_positions(layout: Layout, items: list[VisualItem], merges: dict[int, Merged]) -> Layout:
    """Apply the M-RoPE positions merging results carry: their tokens take the given (t, h, w), and every later
    token of the prompt moves down by the positions the image no longer spans (decoding follows via ``shift``)."""
    overrides = {i: m for i, m in merges.items() if m.positions is not None}
    if not overrides:
        return layout
    positions, shift = layout.positions.clone(), layout.shift.clone()
    for item_index, merge in overrides.items():
        item = items[item_index]
        slots = (layout.item[item.sample] == item.index).nonzero().squeeze(1)
        rows = slots[torch.searchsorted(item_tokens(layout, item), merge.indices)]
        positions[-3:, item.sample, rows] = merge.positions.T.to(positions.dtype)
        later = torch.arange(layout.length, device=slots.device) > slots.max()
        positions[:, item.sample, later & layout.valid[item.sample]] -= merge.advance
        shift[item.sample] += merge.advance
    return dataclasses.replace(layout, positions=positions, shift=shift)


def join_frames(chunk: VisualChunk) -> VisualChunk:
    """A video chunk whose frames are consecutive items as one item of the whole video (``ItemSpec.frames``: each
    frame's rows; grids and structural tokens carried over), so a budget counts the video's tokens and a method may
    move it between frames. Images, one-frame videos and non-consecutive specs are returned as they are."""
    specs = chunk.items
    if chunk.modality != "video" or len(specs) < 2:
        return chunk
    if any(b.start != a.start + a.count for a, b in zip(specs, specs[1:])) or any(s.frames for s in specs):
        return chunk
    start = specs[0].start
    grids = tuple(
        dataclasses.replace(grid, offset=grid.offset + spec.start - start) for spec in specs for grid in spec.grids
    )
    structural = None
    if any(spec.structural is not None for spec in specs):
        structural = torch.cat([
            spec.structural.bool().cpu() if spec.structural is not None else torch.zeros(spec.count, dtype=torch.bool)
            for spec in specs
        ])  # fmt: skip
    joined = ItemSpec(start, sum(s.count for s in specs), grids, structural, tuple(s.count for s in specs))
    return dataclasses.replace(chunk, items=[joined])


def assign_items(
    chunks: list[VisualChunk], placeholders: dict[str, Tensor]
) -> tuple[list[VisualItem], list[list[int]], Tensor, Tensor, dict[int, Tensor]]:
    """Map encoder outputs onto placeholder tokens the way the model's ``masked_scatter`` does (row-major order).

    Returns the items, the item ids of each chunk, each slot's item and item token (-1 for non-visual slots), and
    each item's features.
    """
    any_mask = next(iter(placeholders.values()))
    item_of_slot = torch.full(any_mask.shape, -1, dtype=torch.long, device=any_mask.device)
    token_of_slot = torch.full_like(item_of_slot, -1)
    items: list[VisualItem] = []
    chunk_items: list[list[int]] = [[] for _ in chunks]
    features: dict[int, Tensor] = {}
    first_slot: list[tuple[int, int]] = []
    for modality, mask in placeholders.items():
        modality_chunks = [(i, c) for i, c in enumerate(chunks) if c.modality == modality]
        rows, cols = mask.nonzero(as_tuple=True)
        total = sum(c.features.shape[0] for _, c in modality_chunks)
        if total != rows.numel():
            raise ValueError(
                f"the prompt has {rows.numel()} {modality} placeholder tokens but the vision encoder produced "
                f"{total} {modality} features; the processor and the model disagree"
            )
        cursor = 0
        for chunk_index, chunk in modality_chunks:
            for spec in chunk.items:
                span = slice(cursor + spec.start, cursor + spec.start + spec.count)
                samples = rows[span]
                if bool((samples != samples[0]).any()):
                    raise ValueError(f"a {modality}'s placeholder tokens span several samples of the batch")
                sample = int(samples[0])
                item_of_slot[sample, cols[span]] = len(items)
                token_of_slot[sample, cols[span]] = torch.arange(spec.count, device=cols.device)
                structural = spec.structural.to(cols.device) if spec.structural is not None else None
                items.append(
                    VisualItem(len(items), sample, modality, spec.count, 0, spec.grids, structural, spec.frames)
                )
                features[len(items) - 1] = chunk.features[spec.start : spec.start + spec.count]
                chunk_items[chunk_index].append(len(items) - 1)
                first_slot.append((sample, int(cols[span][0])))
            cursor += chunk.features.shape[0]
    # Each sample's visual tokens are numbered in prompt order, across its images (and video frames).
    visual_rank = (item_of_slot >= 0).long().cumsum(1) - 1
    for item, (sample, col) in zip(items, first_slot):
        item.visual_offset = int(visual_rank[sample, col])
    return items, chunk_items, item_of_slot, token_of_slot, features


def extras_by_chunk(
    chunks: list[VisualChunk], chunk_items: list[list[int]], items: list[VisualItem], layout: Layout
) -> dict[str, dict[str, list[list[Tensor]]]]:
    """Each chunk's per-row extra outputs at the rows its items kept: ``{modality: {field: [layer][chunk]}}``."""
    by_modality: dict[str, dict[str, list[list[Tensor]]]] = {}
    for chunk, item_ids in zip(chunks, chunk_items):
        if not chunk.extras:
            continue
        kept = [spec.start + item_tokens(layout, items[i]) for spec, i in zip(chunk.items, item_ids)]
        rows = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=chunk.features.device)
        fields = by_modality.setdefault(chunk.modality, {})
        for name, per_layer in chunk.extras.items():
            layers = fields.setdefault(name, [[] for _ in per_layer])
            for collected, values in zip(layers, per_layer):
                collected.append(values[rows.to(values.device)])
    return by_modality


def features_by_chunk(
    chunks: list[VisualChunk], chunk_items: list[list[int]], features: dict[int, Tensor]
) -> dict[str, list[Tensor]]:
    """Each chunk's (kept) feature rows, grouped by modality in the order the model consumes them."""
    by_modality: dict[str, list[Tensor]] = {}
    for chunk, item_ids in zip(chunks, chunk_items):
        rows = torch.cat([features[i] for i in item_ids]) if item_ids else chunk.features[:0]
        by_modality.setdefault(chunk.modality, []).append(rows)
    return by_modality
