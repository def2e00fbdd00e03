"""The engine: hooks that apply a method's selections to a Hugging Face VLM's forward.

Everything is done with PyTorch module hooks that :meth:`PruningEngine.remove` takes away again:

* a pre-hook on the multimodal base model (``model.model``) runs the vision encoder, finds each image's
  placeholder tokens, computes the full prompt's position ids and, for a pre-LLM stage, hands the model a shorter
  prompt (fewer placeholders, kept features through ``mm_encoder_outputs``, sliced mask and positions);
* a pre-hook on every decoder layer applies in-LLM stages (gather hidden states, positions, rotary tables, a
  rebuilt causal mask) and feeds the shortened inputs to the following layers, whose KV cache therefore holds only
  kept tokens;
* forward hooks on ``q_proj``/``k_proj`` of the layers whose attention a method needs, so attention rows are
  recomputed for just the query rows asked for (SDPA and FlashAttention stay on);
* decode steps reuse the prefill's layouts: per segment of layers, the prefill mask plus the new tokens' mask,
  and positions lagging the original numbering by the tokens removed before (``Layout.shift``).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache

from vtprune.core.adapter import Adapter, VisualChunk
from vtprune.core.attention import gather_rows
from vtprune.core.budget import Keep, stage_budgets
from vtprune.core.compat import build_mask, get_cache, set_cache
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import Layout, VisualItem, padding_side_of
from vtprune.core.record import ForwardRecord, StageRecord
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, top_budget
from vtprune.core.signals import (
    ImageSignals,
    align_image_signals,
    mean_attention,
    query_slots,
    rotated_queries,
    vit_cls_rows,
)
from vtprune.core.vit import ViTPruning
from vtprune.kernels import gather_tokens

# Per-token inputs of the multimodal forward that must follow the tokens when a pre-LLM stage shortens the prompt.
_PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")
# Images whose tower signals may wait for their prefill (generate() encodes images before prefilling).
_PENDING_IMAGES = 128


@dataclass
class _LayerInputs:
    """Replacement keyword arguments for the decoder layers of one segment."""

    masks: dict[str, Any]
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Tensor | None


@dataclass
class _Session:
    """What decoding after a pruned prefill needs: the cache it filled and its layouts per segment of layers."""

    cache: weakref.ref
    segments: list[Layout]
    prompt_length: int
    decoded: int = 0

    def segment_of(self, layer: int) -> int:
        return max(i for i, layout in enumerate(self.segments) if layout.first_layer <= layer)


@dataclass
class _Pass:
    """State of the forward in flight."""

    prefill: bool
    layout: Layout
    cache: Cache | None
    items: list[VisualItem] = field(default_factory=list)
    features: dict[int, Tensor] = field(default_factory=dict)
    vision: dict[int, ImageSignals] = field(default_factory=dict)
    budgets: dict[int, list[dict[int, int]]] = field(default_factory=dict)
    instruction_ids: list[Tensor] | None = None
    instruction_embeddings: list[Tensor] | None = None
    state: dict = field(default_factory=dict)
    pending: list[tuple[int, Stage]] = field(default_factory=list)
    record: ForwardRecord | None = None
    segments: list[Layout] = field(default_factory=list)
    layer_inputs: _LayerInputs | None = None
    captured: dict[int, dict[str, Any]] = field(default_factory=dict)
    # features merging methods gave the kept tokens at the last stage: item -> (tokens ascending, features)
    merges: dict[int, Merged] = field(default_factory=dict)
    # images re-encoded at a lower resolution: item -> (features, (rows, cols)) (Stage.resample)
    replacements: dict[int, tuple[Tensor, tuple[int, int]]] = field(default_factory=dict)
    # images a reducing vision tower encoded: item -> the tokens its rows stand on (Stage.tower)
    tower_tokens: dict[int, Tensor] = field(default_factory=dict)
    # decode only
    session: _Session | None = None
    new_columns: Tensor | None = None
    positions: Tensor | None = None
    segment_inputs: dict[int, _LayerInputs] = field(default_factory=dict)
    query_length: int = 0


class PruningEngine:
    """Applies ``method`` with budget ``keep`` to ``model`` through hooks; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: Method,
        keep: Keep,
        stages: list[Stage],
        info: ModelInfo,
        budget: str = "final",
        tokenizer: Any = None,
        tower: ViTPruning | None = None,
    ) -> None:
        self.model = model
        # the vision tower's own reduction (a ViT method wrapped inside this VLM); removed with the engine
        self.tower = tower
        self.adapter = adapter
        self.method = method
        self.keep = keep
        self.stages = stages
        self.info = info
        self.budget = budget
        self.tokenizer = tokenizer
        self.renumber = method.positions == "renumber" and not adapter.mrope
        # Decoder layers whose q_proj / k_proj outputs are kept during prefill (attention rows, query states).
        self.capture_layers = sorted(
            {s.attention_from for s in stages if s.attention_from is not None and s.attention_from != s.layer}
            | {s.states_from for s in stages if s.states_from is not None}
        )
        self.observed_layers = sorted(set(method.observed_layers(info)))
        self.vision_layers = sorted({layer for s in stages for layer in s.vision_layers})
        self.observe_vision = any(s.needs_vision_call for s in stages)
        self.wants_text = any(s.text_embeddings for s in stages)
        self.resample = any(s.resample for s in stages)
        self.last: ForwardRecord | None = None
        self.frozen: ForwardRecord | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pass: _Pass | None = None
        self._session: _Session | None = None
        self._labels: Tensor | None = None
        self._output_index: Tensor | None = None
        self._wrapped_encoders: list[str] = []
        self._tower_rows: dict[int, Tensor] | None = None
        self._tower_queries: dict[int, Tensor] = {}
        self._tower_keys: dict[int, Tensor] = {}
        self._vision_calls: OrderedDict[int, tuple[weakref.ref, ImageSignals]] = OrderedDict()
        self._tower_inputs: list[dict[str, Any]] = []
        # Images re-encoded at a lower resolution, keyed by their features: the new (rows, cols) grid.
        self._resampled: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}
        # Images a reducing tower encoded, keyed by their (placed) features: the tokens its rows stand on.
        self._tower_tokens: dict[int, tuple[weakref.ref, Tensor]] = {}
        # Seconds spent on vision-tower signals since the last prefill (generate() encodes images before it).
        self._vision_seconds = 0.0
        # When True, timed regions synchronise CUDA so that ForwardRecord.overhead measures device time too.
        self.synchronize_timers = False

    @contextmanager
    def _timed(self, totals: dict[str, float] | None, key: str) -> Iterator[None]:
        """Add the wall time of the block to ``totals[key]`` (vtprune's own overhead, reported per forward)."""
        sync = self.synchronize_timers and torch.cuda.is_available()
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize()
            if totals is not None:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    # -- installation ------------------------------------------------------------------------------------------
    def install(self) -> None:
        try:
            vlm = self.adapter.vlm
            # prepend=True: hooks the user registered earlier see the inputs the module really runs on.
            self._hooks.append(vlm.register_forward_pre_hook(self._on_vlm_forward, with_kwargs=True, prepend=True))
            self._hooks.append(
                self.adapter.language_model.register_forward_hook(self._on_language_model_done, with_kwargs=True)
            )
            self._hooks.append(
                self.adapter.vision_tower().register_forward_pre_hook(self._on_tower_call, with_kwargs=True)
            )
            # Runs even when the forward raised, so a failed forward leaves no state behind for the next one.
            self._hooks.append(vlm.register_forward_hook(self._on_vlm_done, always_call=True))
            if self.model is not vlm:
                self._hooks.append(
                    self.model.register_forward_pre_hook(self._on_outer_forward, with_kwargs=True, prepend=True)
                )
                self._hooks.append(self.model.register_forward_hook(self._on_outer_done, with_kwargs=True))
            for index, layer in enumerate(self.adapter.decoder_layers):
                self._hooks.append(
                    layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True, prepend=True)
                )
            for index in self.capture_layers:
                attn = self.adapter.decoder_layers[index].self_attn
                for kind in ("q", "k"):
                    projection = getattr(attn, f"{kind}_proj")
                    self._hooks.append(projection.register_forward_hook(self._capture_hook(index, kind)))
            for index in self.observed_layers:
                layer = self.adapter.decoder_layers[index]
                self._hooks.append(
                    layer.self_attn.register_forward_hook(self._observe_hook(index, "attention"), with_kwargs=True)
                )
                self._hooks.append(layer.mlp.register_forward_hook(self._observe_hook(index, "mlp"), with_kwargs=True))
            if self.observe_vision:
                for index in self.vision_layers:
                    attn = self.adapter.vision_attention(index)
                    self._hooks.append(attn.q_proj.register_forward_hook(self._tower_query_hook(index)))
                    self._hooks.append(attn.k_proj.register_forward_hook(self._tower_key_hook(index, attn)))
                for name in self.adapter.encoder_methods:
                    if hasattr(vlm, name):
                        setattr(vlm, name, self._observed_encoder(getattr(vlm, name)))
                        self._wrapped_encoders.append(name)
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name in self._wrapped_encoders:
            delattr(self.adapter.vlm, name)  # the instance attribute shadowed the class's method
        self._wrapped_encoders.clear()
        self._vision_calls.clear()
        self._resampled.clear()
        self._tower_tokens.clear()
        if self.tower is not None:
            self.tower.unwrap()
        self._pass = None
        self._session = None

    # -- vision encoder observation ----------------------------------------------------------------------------
    def _observed_encoder(self, encode):
        """Wrap ``get_image_features``: record [CLS] rows and token sources of each call, keyed by its outputs."""
        signature = inspect.signature(encode)

        def observed(*args, **kwargs):
            call = self.adapter.bind_call(signature, args, kwargs)
            changes = None
            if self.resample:
                resampled = self.adapter.resample_images(call, self._target_grid)
                if resampled is not None:
                    call, changes = resampled
                    args, kwargs = (), call
            self._tower_rows, self._tower_queries, self._tower_keys = {}, {}, {}
            try:
                output = encode(*args, **kwargs)
            finally:
                rows, keys = self._tower_rows, self._tower_keys
                self._tower_rows, self._tower_queries, self._tower_keys = None, {}, {}
            start = time.perf_counter()
            if self.tower is not None:
                self._place_tower_rows(call, output)
            per_image = getattr(output, "pooler_output", None)
            for tensor, change in zip(per_image if changes else (), changes or ()):
                if change is not None:
                    self._resampled[id(tensor)] = (weakref.ref(tensor), change[1])
            sources = self.adapter.image_sources(call, output) if per_image is not None else None
            if sources is not None:
                states = self.adapter.encoder_states(call, output) if self._wants_encoder_features() else None
                aligned = align_image_signals(
                    sources[0], sources[1], rows, states, keys, self.adapter.cls_position if states is not None else None
                )
                for dead in [key for key, (ref, _) in self._vision_calls.items() if ref() is None]:
                    del self._vision_calls[dead]
                for tensor, signals in zip(per_image, aligned):
                    # re-insert at the end: a freed tensor's id comes back, and the trim below drops the oldest
                    self._vision_calls.pop(id(tensor), None)
                    self._vision_calls[id(tensor)] = (weakref.ref(tensor), signals)
                while len(self._vision_calls) > _PENDING_IMAGES:
                    self._vision_calls.popitem(last=False)
            self._vision_seconds += time.perf_counter() - start
            return output

        return observed

    def _place_tower_rows(self, call: dict[str, Any], output: Any) -> None:
        """A reducing tower's features go on as placeholder-sized stand-ins, each row on the token its representative
        stands for (zeros elsewhere), so images still map onto their placeholders; the pre-LLM stage then keeps
        exactly those tokens. Also notes the rows each tower block ran on, for the FLOPs report."""
        record = self.tower.last
        sources = self.adapter.image_sources(call, output)
        if record.origin is None or sources is None:
            raise RuntimeError("the vision tower's reduction left no record of where its rows came from")
        per_image, per_view = sources
        placed, read = [], 0
        for features, source in zip(output.pooler_output, per_image):
            source = source.to(features.device)
            view, read = int(source[0]) // per_view, features.shape[0]
            # the VLM read the last rows of the tower's output (LLaVA drops [CLS] in front)
            rows = record.origin[view, -read:].to(features.device) + view * per_view
            tokens = torch.searchsorted(source, rows).clamp(max=source.numel() - 1)
            if not bool((source[tokens] == rows).all()):
                raise RuntimeError("the vision tower's rows do not map onto the image's tokens")
            full = features.new_zeros(source.numel(), features.shape[-1])
            full[tokens] = features
            self._tower_tokens[id(full)] = (weakref.ref(full), tokens.sort().values)
            placed.append(full)
        output.pooler_output = placed
        for entry in self._tower_inputs[-1:]:  # this call's (the tower's pre-hook added it)
            entry["block_rows"] = [*record.seq_lens, record.origin.shape[1]]
            entry["projected_rows"] = read

    def _on_tower_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # generate() encodes before prefill: keep what the tower saw for the next prefill's record
        self._tower_inputs.extend(self.adapter.tower_inputs(args, kwargs))

    def _target_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The token grid an image of ``rows x cols`` tokens is re-encoded on (Stage.resample)."""
        budget = stage_budgets(self.keep, rows * cols, [(None, 1.0)], self.info.num_layers, self.budget)[0]
        return self.method.target_grid(rows, cols, budget)

    def _wants_encoder_features(self) -> bool:
        return any(s.encoder_features for s in self.stages)

    def _tower_query_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._tower_rows is not None:
                self._tower_queries[index] = output

        return hook

    def _tower_key_hook(self, index: int, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._tower_rows is not None and index in self._tower_queries:
                start = time.perf_counter()
                queries = self._tower_queries.pop(index)
                self._tower_rows[index] = vit_cls_rows(queries, output, attn.num_heads, attn.scale)
                self._tower_keys[index] = output.unflatten(-1, (attn.num_heads, -1)).mean(2)  # head-averaged
                self._vision_seconds += time.perf_counter() - start

        return hook

    def _signals_of(self, features: Tensor) -> ImageSignals | None:
        entry = self._vision_calls.get(id(features))
        if entry is None or entry[0]() is not features:
            return None
        return entry[1]

    # -- hooks -------------------------------------------------------------------------------------------------
    def _on_vlm_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._pass = None
        self._output_index = None
        inputs = self.adapter.bind_forward(args, kwargs)
        cache = get_cache(inputs)
        if cache is not None and cache.get_seq_length() > 0:
            session = self._session
            if session is not None and session.cache() is cache:
                return self._start_decode(inputs, session)
            return None  # continuing a cache that no pruned prefill made: nothing to do
        return self._start_prefill(inputs)

    def _on_vlm_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._pass = None

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._pass is None:
                return None
            return self._on_layer(index, args, kwargs)

        return hook

    def _capture_hook(self, index: int, kind: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            current = self._pass
            if current is not None and current.prefill:
                current.captured.setdefault(index, {})[kind] = output

        return hook

    def _observe_hook(self, index: int, part: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            current = self._pass
            if current is None or not current.prefill:
                return
            inputs = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            result = output[0] if isinstance(output, tuple) else output
            with self._timed(current.record.overhead, "observe"):
                self.method.observe(current.state, index, part, inputs, result, current.layout)

        return hook

    def _on_language_model_done(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current, self._pass = self._pass, None
        if current is None:
            return
        if current.prefill:
            record = current.record
            record.output_index = current.layout.token
            lengths = [layout.lengths() for layout in current.segments]
            starts = [layout.first_layer for layout in current.segments]
            record.tokens_per_layer = [
                lengths[max(i for i, start in enumerate(starts) if start <= layer)] for layer in range(len(record.seq_lens))
            ]
            self.last = record
            self._output_index = current.layout.token
            self._session = (
                _Session(weakref.ref(current.cache), current.segments, current.record.input_length)
                if current.cache is not None
                else None
            )
        else:
            current.session.decoded += current.query_length

    def _on_outer_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Labels follow the kept tokens, so the loss is computed after the forward (see _on_outer_done).
        self._labels = kwargs.pop("labels", None)
        return args, kwargs

    def _on_outer_done(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self._labels = self._labels, None
        if labels is None or getattr(output, "logits", None) is None:
            return output
        index = self._output_index
        if index is not None:
            labels = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)
        if output.logits.shape[1] == labels.shape[1]:
            vocab = module.config.get_text_config().vocab_size
            output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=vocab)
        return output

    # -- prefill -----------------------------------------------------------------------------------------------
    def _start_prefill(self, inputs: dict[str, Any]) -> tuple[tuple, dict] | None:
        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return None
        chunks = self.adapter.encode(inputs)
        if not chunks:
            self._tower_inputs = []
            return None  # text-only batch
        replaced = self._take_resampled(chunks)
        tower_tokens = _claim(self._tower_tokens, chunks)
        batch, length = reference.shape[:2]
        device = reference.device
        cache = self._prefill_cache(inputs)

        placeholders = self.adapter.placeholder_masks(input_ids, embeds)
        items, chunk_items, item_of_slot, token_of_slot, features = _assign_items(chunks, placeholders)
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
        )
        record = ForwardRecord(
            items=[{"sample": i.sample, "modality": i.modality, "num_tokens": i.num_tokens} for i in items],
            item_grids=[[(g.offset, g.height, g.width, g.row_stride) for g in i.grids] for i in items],
            input_length=length,
            budget=self.budget,
        )
        if self.observe_vision:
            record.overhead["vision"], self._vision_seconds = self._vision_seconds, 0.0
        record.encoder_inputs, self._tower_inputs = self._tower_inputs, []
        current = _Pass(
            prefill=True,
            layout=layout,
            cache=cache,
            items=items,
            features=features,
            vision=self._item_vision(chunks, chunk_items),
            pending=list(enumerate(self.stages)),
            record=record,
            segments=[layout],
        )
        current.budgets = {item.index: self._item_budgets(item, current.vision.get(item.index)) for item in items}
        current.replacements = {chunk_items[i][0]: value for i, value in replaced.items()}
        current.tower_tokens = {chunk_items[i][0]: value for i, value in tower_tokens.items()}
        if self.wants_text:
            current.instruction_ids, current.instruction_embeddings = self._instruction(input_ids, embeds, layout)
        if current.pending and current.pending[0][1].layer is None:
            stage_index, stage = current.pending.pop(0)
            with self._timed(current.record.overhead, "select"):
                keep = self._run_stage(current, stage_index, stage)
            if keep is not None:
                shorter = layout.compact(keep, renumber=self.renumber, first_layer=0)
                inputs = self._shorten_prompt(inputs, shorter)
                current.features = self._kept_features(items, features, shorter)
                current.layout = shorter
                current.segments = [shorter]
            for item_index, merge in current.merges.items():
                kept_tokens = self._item_tokens(current.layout, items[item_index])
                rows = torch.searchsorted(kept_tokens, merge.indices)
                current.features[item_index] = current.features[item_index].clone()
                current.features[item_index][rows] = merge.features.to(current.features[item_index].dtype)
            current.layout = self._override_positions(current.layout, items, current.merges)
            current.segments = [current.layout]
        inputs["mm_encoder_outputs"] = self.adapter.encoder_outputs(
            _features_by_chunk(chunks, chunk_items, current.features)
        )
        for key in self.adapter.raw_visual_inputs:
            inputs[key] = None
        inputs["position_ids"] = current.layout.positions
        set_cache(inputs, cache, self.adapter.cache_parameter)
        self._pass = current
        return (), inputs

    def _take_resampled(self, chunks: list[VisualChunk]) -> dict[int, tuple[Tensor, tuple[int, int]]]:
        """Chunks whose image was re-encoded smaller: set their new features aside, by chunk, and give the chunk
        placeholder-sized stand-ins so its tokens still map onto the prompt's placeholders."""
        replaced = {}
        for index, grid in _claim(self._resampled, chunks).items():
            chunk = chunks[index]
            replaced[index] = (chunk.features, grid)
            count = sum(spec.count for spec in chunk.items)
            chunk.features = chunk.features.new_zeros(count, chunk.features.shape[-1])
        return replaced

    def _item_vision(self, chunks: list[VisualChunk], chunk_items: list[list[int]]) -> dict[int, ImageSignals]:
        """Tower signals of each item, from the observed encoder call that produced its chunk."""
        if not self.observe_vision:
            return {}
        vision = {}
        for chunk, item_ids in zip(chunks, chunk_items):
            signals = self._signals_of(chunk.features)
            for spec, item_id in zip(chunk.items, item_ids):
                if signals is not None:
                    vision[item_id] = signals.rows(spec.start, spec.count)
                elif self.vision_layers or self._wants_encoder_features():
                    raise ValueError(
                        f"{self.method.name} needs the vision tower's signals of every image, but this "
                        f"{chunk.modality} was encoded outside the wrapped model (precomputed mm_encoder_outputs); "
                        "pass pixel_values instead"
                    )
        return vision

    def _item_budgets(self, item: VisualItem, signals: ImageSignals | None) -> list[dict[int, int]]:
        """Per stage, the budget of each group of the item's tokens: {-1: n} for the whole item, or one per view."""
        specs = [(stage.layer, stage.scale) for stage in self.stages]
        layers = self.info.num_layers
        whole = stage_budgets(self.keep, item.num_selectable, specs, layers, self.budget)
        per_view: dict[int, list[int]] = {}
        if signals is not None and any(stage.per_crop for stage in self.stages):
            views = signals.view[item.selectable_mask(signals.view.device)]
            for view, count in zip(*torch.unique(views, return_counts=True)):
                if int(view) >= 0:
                    per_view[int(view)] = stage_budgets(self.keep, int(count), specs, layers, self.budget)
        return [
            {view: counts[i] for view, counts in per_view.items()} if stage.per_crop and per_view else {-1: whole[i]}
            for i, stage in enumerate(self.stages)
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

    def _prefill_cache(self, inputs: dict[str, Any]) -> Cache | None:
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
        for key in _PER_TOKEN_INPUTS:
            if isinstance(inputs.get(key), Tensor) and inputs[key].ndim == 2:
                inputs[key] = inputs[key].gather(1, index).masked_fill(pad, 0)
        return inputs

    def _input_rows(self, current: _Pass, item: VisualItem, tokens: Tensor) -> Tensor:
        """Rows of ``current.features[item]`` (the features the LLM received) holding ``tokens``."""
        return torch.searchsorted(self._item_tokens(current.segments[0], item), tokens)

    def _override_positions(self, layout: Layout, items: list[VisualItem], merges: dict[int, Merged]) -> Layout:
        """Apply the M-RoPE positions merging results carry: their tokens take the given (t, h, w), and every later
        token of the prompt moves down by the positions the image no longer spans (decoding follows via ``shift``)."""
        overrides = {i: m for i, m in merges.items() if m.positions is not None}
        if not overrides:
            return layout
        positions, shift = layout.positions.clone(), layout.shift.clone()
        for item_index, merge in overrides.items():
            item = items[item_index]
            slots = (layout.item[item.sample] == item.index).nonzero().squeeze(1)
            rows = slots[torch.searchsorted(self._item_tokens(layout, item), merge.indices)]
            positions[-3:, item.sample, rows] = merge.positions.T.to(positions.dtype)
            later = torch.arange(layout.length, device=slots.device) > slots.max()
            positions[:, item.sample, later & layout.valid[item.sample]] -= merge.advance
            shift[item.sample] += merge.advance
        return dataclasses.replace(layout, positions=positions, shift=shift)

    @staticmethod
    def _item_tokens(layout: Layout, item: VisualItem) -> Tensor:
        """The item's tokens present in ``layout``, in slot (= ascending token) order."""
        return layout.item_token[item.sample][layout.item[item.sample] == item.index]

    def _kept_features(self, items: list[VisualItem], features: dict[int, Tensor], layout: Layout) -> dict[int, Tensor]:
        return {item.index: features[item.index][self._item_tokens(layout, item)] for item in items}

    def _on_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        current = self._pass
        hidden = original = args[0] if args else kwargs["hidden_states"]
        if not current.prefill:
            return self._decode_layer(index, hidden, args, kwargs)
        while current.pending and current.pending[0][1].layer == index:
            stage_index, stage = current.pending.pop(0)
            position_embeddings = (
                current.layer_inputs.position_embeddings if current.layer_inputs else kwargs["position_embeddings"]
            )
            with self._timed(current.record.overhead, "select"):
                keep = self._run_stage(
                    current, stage_index, stage, hidden=hidden, position_embeddings=position_embeddings
                )
            if keep is not None:
                shorter = current.layout.compact(keep, renumber=self.renumber, first_layer=index)
                hidden = gather_tokens(hidden, shorter.source.clamp(min=0), check=False)
                current.layout = shorter
                current.segments.append(shorter)
                current.layer_inputs = self._layer_inputs(
                    hidden, current.cache, shorter.valid, shorter.positions, index
                )
            if current.merges:
                hidden = hidden.clone()
                for item_index, merge in current.merges.items():
                    item = current.items[item_index]
                    slots = (current.layout.item[item.sample] == item.index).nonzero().squeeze(1)
                    rows = slots[torch.searchsorted(self._item_tokens(current.layout, item), merge.indices)]
                    hidden[item.sample, rows] = merge.features.to(hidden.dtype)
        current.record.seq_lens.append(hidden.shape[1])
        if current.layer_inputs is not None:
            args, kwargs = _replace_layer_inputs(args, kwargs, hidden, current.layer_inputs, self._layer_type(index))
        elif hidden is not original:  # merged features but nothing dropped
            args, kwargs = _replace_hidden(args, kwargs, hidden)
        if index in self.capture_layers:
            current.captured.setdefault(index, {}).update(
                position_embeddings=kwargs["position_embeddings"], layout=current.layout
            )
        return args, kwargs

    def _run_stage(
        self,
        current: _Pass,
        stage_index: int,
        stage: Stage,
        *,
        hidden: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | None:
        """Select at one stage; returns the slots to keep, or None when nothing is dropped."""
        layout = current.layout
        views = [self._item_view(current, order, item, stage_index, stage) for order, item in enumerate(current.items)]
        ctx = PruneContext(
            stage=stage,
            model=self.info,
            layout=layout,
            items=views,
            hidden_states=hidden,
            state=current.state,
            instruction_ids=current.instruction_ids,
            instruction_embeddings=current.instruction_embeddings,
            embed=self.adapter.vlm.get_input_embeddings(),
            tokenizer=self.tokenizer,
        )
        if stage.attention_from is not None:
            ctx._signals["attention"] = lambda: self._attention(current, stage, hidden, position_embeddings)
            ctx._attention_of = lambda rows, real: self._attention(
                current, stage, hidden, position_embeddings, (rows, real)
            )
        if stage.states_from is not None:
            ctx._signals["query_states"] = lambda: self._query_states(current, stage)

        scores: list[Tensor | None] = [None] * len(views)
        current.merges = {}
        if self.frozen is not None:
            selections = _replay(self.frozen, stage_index, views)
            # merged features depend on prompt tokens only, so the recorded ones are what a rerun would compute
            current.merges = dict(self.frozen.stages[stage_index].merges)
        elif type(self.method).select is Method.select:
            scores = self.method.score(ctx)
            selections = top_budget(views, scores)
        else:
            selections = self.method.select(ctx)
        for i, (view, chosen) in enumerate(zip(views, selections)):
            if isinstance(chosen, Merged):
                selections[i] = chosen.indices
                order = chosen.indices.argsort()
                merged = chosen.features[order]
                if chosen.space == "encoder":
                    merged = self.adapter.project(merged)
                elif chosen.space != "llm":
                    raise RuntimeError(f"{self.method.name}: Merged.space must be 'llm' or 'encoder'")
                if chosen.positions is not None and stage.layer is not None:
                    raise RuntimeError(f"{self.method.name}: Merged.positions are only allowed before the LLM")
                current.merges[view.item.index] = Merged(
                    view.tokens[chosen.indices[order]],
                    merged,
                    positions=chosen.positions[order] if chosen.positions is not None else None,
                    advance=chosen.advance,
                    combined=chosen.combined[order] if chosen.combined is not None else None,
                )
        _check_selections(self.method.name, views, selections)

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
                kept=_kept_per_sample(current.items, kept_per_item, layout.batch_size),
                kept_per_item=kept_per_item,
                scores_per_item=[s.detach().float() if s is not None else None for s in scores],
                merges=dict(current.merges),
            )
        )
        if bool((keep == layout.valid).all()):
            return None
        return keep

    def _item_view(self, current: _Pass, order: int, item: VisualItem, stage_index: int, stage: Stage) -> ItemView:
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
        cls_attention = None
        if stage.vision_layers:
            cls_attention = torch.stack([signals.cls_attention[layer] for layer in stage.vision_layers])[:, tokens]
        return ItemView(
            item=item,
            order=order,
            tokens=tokens,
            slots=slots,
            selectable=selectable,
            budget=budget,
            features=current.features[item.index][self._input_rows(current, item, tokens)],
            encoder_features=(
                signals.encoder_features[tokens]
                if stage.encoder_features and signals is not None and signals.encoder_features is not None
                else None
            ),
            cls_attention=cls_attention,
            encoder_keys=(
                signals.keys[stage.vision_layers[-1]].to(slots.device)[tokens] if stage.vision_layers else None
            ),
            cls_features=signals.view_cls if stage.encoder_features and signals is not None else None,
            replacement=current.replacements.get(item.index, (None, None))[0],
            replacement_grid=current.replacements.get(item.index, (None, None))[1],
            tower_tokens=current.tower_tokens.get(item.index),
            groups=groups,
            group_budgets=group_budgets,
        )

    def _attention(
        self,
        current: _Pass,
        stage: Stage,
        hidden: Tensor | None,
        position_embeddings: tuple[Tensor, Tensor] | None,
        query: str | tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        layout = current.layout
        attn = self.adapter.decoder_layers[stage.attention_from].self_attn
        if stage.attention_from == stage.layer:  # this layer's own attention, from its input
            normed = self.adapter.decoder_layers[stage.layer].input_layernorm(hidden)
            keys = attn.k_proj(normed)

            def queries(slots: Tensor) -> Tensor:
                return attn.q_proj(gather_rows(normed, slots))
        else:
            captured = self._captured(current, stage.attention_from, layout)
            keys, position_embeddings = captured["k"], captured["position_embeddings"]

            def queries(slots: Tensor) -> Tensor:
                return gather_rows(captured["q"], slots)
        return mean_attention(attn, queries, keys, position_embeddings, layout, query or stage.query)

    def _query_states(self, current: _Pass, stage: Stage) -> Tensor:
        captured = self._captured(current, stage.states_from, current.layout)
        attn = self.adapter.decoder_layers[stage.states_from].self_attn
        return rotated_queries(attn, captured["q"], captured["position_embeddings"])

    @staticmethod
    def _captured(current: _Pass, layer: int, layout: Layout) -> dict[str, Any]:
        captured = current.captured.get(layer, {})
        if captured.get("layout") is not layout or "q" not in captured or "k" not in captured:
            raise RuntimeError(f"decoder layer {layer}'s queries and keys were not captured for this stage")
        return captured

    # -- decode ------------------------------------------------------------------------------------------------
    def _start_decode(self, inputs: dict[str, Any], session: _Session) -> tuple[tuple, dict]:
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
            positions = self.adapter.decode_positions(inputs, seen, query_length, batch)
        elif not self.adapter.mrope:
            positions = positions.expand(batch, -1)
        base = session.segments[0]
        inputs["attention_mask"] = torch.cat([base.valid.to(new_columns.dtype), new_columns], dim=1)
        inputs["position_ids"] = _shifted(positions, base.shift)
        self._pass = _Pass(
            prefill=False,
            layout=base,
            cache=get_cache(inputs),
            session=session,
            new_columns=new_columns,
            positions=positions,
            query_length=query_length,
        )
        return (), inputs

    def _decode_layer(self, index: int, hidden: Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        current = self._pass
        segment = current.session.segment_of(index)
        if segment == 0:
            return None
        if segment not in current.segment_inputs:
            layout = current.session.segments[segment]
            mask = torch.cat([layout.valid.to(current.new_columns.dtype), current.new_columns], dim=1)
            positions = _shifted(current.positions, layout.shift)
            current.segment_inputs[segment] = self._layer_inputs(hidden, current.cache, mask, positions, index)
        return _replace_layer_inputs(args, kwargs, hidden, current.segment_inputs[segment], self._layer_type(index))

    # -- shared ------------------------------------------------------------------------------------------------
    def _layer_inputs(
        self, hidden: Tensor, cache: Cache | None, mask: Tensor, positions: Tensor, layer: int
    ) -> _LayerInputs:
        config = self.adapter.text_config
        masks = {}
        for layer_type in set(getattr(config, "layer_types", None) or ["full_attention"]):
            masks[layer_type] = build_mask(layer_type, config, hidden, mask, cache, layer)
        _, layer_positions = self.adapter.split_positions(positions)
        return _LayerInputs(masks, self.adapter.rotary(hidden, positions), layer_positions)

    def _layer_type(self, index: int) -> str:
        layer_types = getattr(self.adapter.text_config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"


def _assign_items(
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
                items.append(VisualItem(len(items), sample, modality, spec.count, 0, spec.grids, structural))
                features[len(items) - 1] = chunk.features[spec.start : spec.start + spec.count]
                chunk_items[chunk_index].append(len(items) - 1)
                first_slot.append((sample, int(cols[span][0])))
            cursor += chunk.features.shape[0]
    # Each sample's visual tokens are numbered in prompt order, across its images (and video frames).
    visual_rank = (item_of_slot >= 0).long().cumsum(1) - 1
    for item, (sample, col) in zip(items, first_slot):
        item.visual_offset = int(visual_rank[sample, col])
    return items, chunk_items, item_of_slot, token_of_slot, features


def _claim(store: dict[int, tuple[weakref.ref, Any]], chunks: list[VisualChunk]) -> dict[int, Any]:
    """By chunk index, what the encoder call noted under the chunk's feature tensor (``store`` is keyed by the
    tensor's id, and the weak reference tells a reused id apart); empties ``store``, as entries are for one prefill."""
    claimed = {}
    for index, chunk in enumerate(chunks):
        entry = store.pop(id(chunk.features), None)
        if entry is not None and entry[0]() is chunk.features:
            claimed[index] = entry[1]
    store.clear()
    return claimed


def _features_by_chunk(
    chunks: list[VisualChunk], chunk_items: list[list[int]], features: dict[int, Tensor]
) -> dict[str, list[Tensor]]:
    """Each chunk's (kept) feature rows, grouped by modality in the order the model consumes them."""
    by_modality: dict[str, list[Tensor]] = {}
    for chunk, item_ids in zip(chunks, chunk_items):
        rows = torch.cat([features[i] for i in item_ids]) if item_ids else chunk.features[:0]
        by_modality.setdefault(chunk.modality, []).append(rows)
    return by_modality


def _kept_per_sample(items: list[VisualItem], kept_per_item: list[Tensor], batch: int) -> list[Tensor]:
    per_sample: list[list[Tensor]] = [[] for _ in range(batch)]
    for item, kept in zip(items, kept_per_item):
        per_sample[item.sample].append(kept + item.visual_offset)
    device = kept_per_item[0].device if kept_per_item else None
    return [
        torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.long, device=device)
        for parts in per_sample
    ]


def _check_selections(name: str, views: list[ItemView], selections: list[Tensor]) -> None:
    if len(selections) != len(views):
        raise RuntimeError(f"{name} returned {len(selections)} selections for {len(views)} images")
    for view, chosen in zip(views, selections):
        if chosen.ndim != 1 or chosen.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"{name} must return 1-D integer indices per image, got {chosen.dtype} {chosen.shape}")
        if chosen.numel() > view.budget or (view.budget > 0 and chosen.numel() == 0):
            raise RuntimeError(f"{name} kept {chosen.numel()} tokens of an image whose budget is {view.budget}")
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= view.num_tokens):
            raise RuntimeError(f"{name} returned indices outside [0, {view.num_tokens})")
        if chosen.unique().numel() != chosen.numel() or not bool(view.selectable[chosen].all()):
            raise RuntimeError(f"{name} returned repeated or structural token indices")


def _replay(frozen: ForwardRecord, stage_index: int, views: list[ItemView]) -> list[Tensor]:
    """The selection a frozen record made, mapped onto this forward's tokens."""
    if stage_index >= len(frozen.stages) or len(frozen.stages[stage_index].kept_per_item) != len(views):
        raise ValueError("the frozen selection was recorded on a different batch of images; unfreeze first")
    selections = []
    for view, kept in zip(views, frozen.stages[stage_index].kept_per_item):
        chosen = torch.isin(view.tokens, kept.to(view.tokens.device)) & view.selectable
        selections.append(chosen.nonzero().squeeze(1))
    return selections


def _shifted(positions: Tensor, shift: Tensor) -> Tensor:
    """Positions of newly decoded tokens in a layout whose numbering lags the original by ``shift``."""
    return positions - shift.to(positions.dtype)[:, None]


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _replace_layer_inputs(
    args: tuple, kwargs: dict, hidden: Tensor, inputs: _LayerInputs, layer_type: str
) -> tuple[tuple, dict]:
    args, kwargs = _replace_hidden(args, kwargs, hidden)
    kwargs["attention_mask"] = inputs.masks[layer_type]
    kwargs["position_embeddings"] = inputs.position_embeddings
    kwargs["position_ids"] = inputs.position_ids
    return args, kwargs
