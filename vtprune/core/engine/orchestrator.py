"""The engine: hooks that apply a method's selections to a Hugging Face VLM's forward.

Everything is done with PyTorch module hooks, held in one :class:`HookSet` that :meth:`PruningEngine.remove` takes
away again:

* the :class:`VisionObserver` wraps the model's encoder methods and the tower's attention projections, noting per
  image what a method needs from the tower (and, for a reducing tower, which tokens its rows stand on);
* a pre-hook on the multimodal base model (``model.model``) starts a prefill (:class:`PrefillPlanner`: items,
  layout, budgets, positions and, for a pre-LLM stage, a shorter prompt with the kept features through
  ``mm_encoder_outputs``) or a decode step (:mod:`.decode`, which also applies a method's decode-time drops of
  cached visual tokens);
* a pre-hook on every decoder layer applies in-LLM stages (:class:`StageRunner` selects; the engine gathers hidden
  states and positions and rebuilds the layers' masks and rotary tables), so later layers' KV cache holds only
  kept tokens;
* forward hooks on the query / key projections of the layers whose attention a method needs, so attention rows
  are recomputed for just the query rows asked for (SDPA and FlashAttention stay on);
* hooks on the outer model realign ``labels`` with the kept tokens.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.core.adapter import Adapter
from vtprune.core.budget import Keep, stage_budgets
from vtprune.core.compat import get_cache
from vtprune.core.engine.decode import (
    checked_decode_stages,
    decode_layer,
    decode_policy,
    earlier_cache_cut,
    start_decode,
)
from vtprune.core.engine.hooks import HookSet
from vtprune.core.engine.observer import VisionObserver
from vtprune.core.engine.prefill import PrefillPlanner
from vtprune.core.engine.stages import StageRunner
from vtprune.core.engine.state import (
    Decode,
    DecodePolicy,
    Prefill,
    Schedule,
    Session,
    item_tokens,
    layer_inputs,
    replace_hidden,
    replace_layer_inputs,
)
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import Method, ModelInfo, Stage
from vtprune.core.vit import ViTPruning
from vtprune.kernels import gather_tokens


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
        budget_unit: str = "video",
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
        self.budget_unit = budget_unit
        # Decoder layers whose query / key projections are kept during prefill (attention rows, query states).
        self.capture_layers = sorted(
            {s.attention_from for s in stages if s.attention_from is not None and s.attention_from != s.layer}
            | {s.states_from for s in stages if s.states_from is not None}
        )
        self.observed_layers = sorted(set(method.observed_layers(info)))
        # where the method drops cached visual tokens while generating (decode.py)
        self.decode_stages = checked_decode_stages(method, method.decode_stages(info, keep), info)
        self.runner = StageRunner(adapter, method, info, tokenizer)
        self.observer = VisionObserver(adapter, stages, self._target_grid, tower)
        schedule = Schedule(stages, keep, info, budget, budget_unit)
        self.planner = PrefillPlanner(adapter, self.observer, self.runner, schedule, self._timed)
        self.last: ForwardRecord | None = None
        # the forward in flight (None between forwards)
        self.current: Prefill | Decode | None = None
        self._hooks = HookSet()
        self._session: Session | None = None
        self._labels: Tensor | None = None
        self._output_index: Tensor | None = None
        # When True, timed regions synchronise CUDA so that ForwardRecord.overhead measures device time too.
        self.synchronize_timers = False

    @property
    def frozen(self) -> ForwardRecord | None:
        """A record whose selections every forward replays instead of selecting (``Pruning.freeze``)."""
        return self.runner.frozen

    @frozen.setter
    def frozen(self, record: ForwardRecord | None) -> None:
        self.runner.frozen = record

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

    def _target_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The token grid an image of ``rows x cols`` tokens is re-encoded on (Stage.resample)."""
        budget = stage_budgets(self.keep, rows * cols, [(None, 1.0)], self.info.num_layers, self.budget)[0]
        return self.method.target_grid(rows, cols, budget)

    # -- installation ------------------------------------------------------------------------------------------
    def install(self) -> None:
        hooks, vlm = self._hooks, self.adapter.vlm
        try:
            # prepend=True: hooks the user registered earlier see the inputs the module really runs on.
            hooks.add(vlm.register_forward_pre_hook(self._on_vlm_forward, with_kwargs=True, prepend=True))
            hooks.add(self.adapter.language_model.register_forward_hook(self._on_language_model_done, with_kwargs=True))
            # Runs even when the forward raised, so a failed forward leaves no state behind for the next one.
            hooks.add(vlm.register_forward_hook(self._on_vlm_done, always_call=True))
            if self.model is not vlm:
                hooks.add(self.model.register_forward_pre_hook(self._on_outer_forward, with_kwargs=True, prepend=True))
                hooks.add(self.model.register_forward_hook(self._on_outer_done, with_kwargs=True))
            for index, layer in enumerate(self.adapter.decoder_layers):
                hooks.add(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True, prepend=True))
            for index in self.capture_layers:
                parts = self.adapter.decoder_parts(index)
                for kind, projection in (("q", parts.query), ("k", parts.key)):
                    hooks.add(projection.register_forward_hook(self._capture_hook(index, kind)))
            for index in self.observed_layers:
                parts = self.adapter.decoder_parts(index)
                for part, module in (("attention", parts.attention), ("mlp", parts.mlp)):
                    hooks.add(module.register_forward_hook(self._observe_hook(index, part), with_kwargs=True))
            self.adapter.follow_kept_rows(hooks.patch, self._rows_since_input)
            self.observer.install(hooks)
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self._hooks.remove()
        self.observer.clear()
        if self.tower is not None:
            self.tower.unwrap()
        self.current = None
        self._session = None

    # -- the multimodal forward --------------------------------------------------------------------------------
    def _on_vlm_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.current = None
        self._output_index = None
        inputs = self.adapter.bind_forward(args, kwargs)
        cache = get_cache(inputs)
        if cache is not None and cache.get_seq_length() > 0:
            session = self._session
            if session is None or session.cache() is not cache:
                return None  # continuing a cache that no pruned prefill made: nothing to do
            self.current, inputs = start_decode(self.adapter, inputs, session)
            return (), inputs
        started = self.planner.start(inputs)
        if started is None:
            return None
        self.current, inputs = started
        return (), inputs

    def _on_vlm_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current = None

    def _on_language_model_done(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        if not current.prefill:
            current.session.decoded += current.query_length
            return
        record = current.record
        # -1 for padding also where no stage dropped anything (the first layout numbers its padding slots too)
        record.output_index = current.layout.token.masked_fill(~current.layout.valid, -1)
        lengths = [layout.lengths() for layout in current.segments]
        starts = [layout.first_layer for layout in current.segments]
        record.tokens_per_layer = [
            lengths[max(i for i, start in enumerate(starts) if start <= layer)] for layer in range(len(record.seq_lens))
        ]
        self.last = record
        self._output_index = current.layout.token
        policy = decode_policy(
            self.method, self.decode_stages, self.info, current.items, record, self.runner.frozen, current.state
        )
        cut = earlier_cache_cut(self.stages, record, current.items) if current.cache is not None else None
        if cut is not None:  # PruneVid's retroactive cut: leaves the earlier layers' caches before decode step 1
            if policy is None:
                frozen = self.runner.frozen
                policy = DecodePolicy(self.method, [], self.info, current.items, record, frozen, current.state)
            record.decode_drops.append(cut)
            for item, gone in zip(current.items, cut.dropped_per_item):
                if gone.numel():
                    policy.pending[item.index] = gone
        self._session = (
            Session(weakref.ref(current.cache), current.segments, record.input_length, policy=policy)
            if current.cache is not None
            else None
        )

    def _rows_since_input(self) -> Tensor | None:
        """During a prefill: each current slot's slot in the language model's input (-1 = padding), composed over
        the in-LLM stages so far; None when none has dropped anything."""
        current = self.current
        if current is None or not current.prefill or len(current.segments) < 2:
            return None
        rows = current.segments[-1].source
        for segment in reversed(current.segments[1:-1]):
            rows = segment.source.gather(1, rows.clamp(min=0)).masked_fill(rows < 0, -1)
        return rows

    # -- decoder layers ----------------------------------------------------------------------------------------
    def _layer_hook(self, index: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            current = self.current
            if current is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not current.prefill:
                return decode_layer(self.adapter, current, index, hidden, args, kwargs)
            return self._prefill_layer(current, index, hidden, args, kwargs)

        return hook

    def _prefill_layer(
        self, current: Prefill, index: int, hidden: Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Run the stages at layer ``index``; later layers get the shortened hidden states, mask and positions."""
        original = hidden
        while current.pending and current.pending[0][1].layer == index:
            stage_index, stage = current.pending.pop(0)
            position_embeddings = (
                current.layer_inputs.position_embeddings[self.adapter.layer_types()[index]]
                if current.layer_inputs
                else kwargs["position_embeddings"]
            )
            with self._timed(current.record.overhead, "select"):
                keep = self.runner.run(current, stage_index, stage, hidden=hidden, position_embeddings=position_embeddings)
            if keep is not None:
                shorter = current.layout.compact(keep, renumber=self.planner.renumbers(stage), first_layer=index)
                hidden = gather_tokens(hidden, shorter.source.clamp(min=0), check=False)
                current.layout = shorter
                current.segments.append(shorter)
                current.layer_inputs = layer_inputs(
                    self.adapter, hidden, current.cache, shorter.valid, shorter.positions, index, shorter.blocks
                )
            if current.merges:
                hidden = hidden.clone()
                for item_index, merge in current.merges.items():
                    item = current.items[item_index]
                    slots = (current.layout.item[item.sample] == item.index).nonzero().squeeze(1)
                    rows = slots[torch.searchsorted(item_tokens(current.layout, item), merge.indices)]
                    hidden[item.sample, rows] = merge.features.to(hidden.dtype)
        current.record.seq_lens.append(hidden.shape[1])
        if current.layer_inputs is not None:
            layer_type = self.adapter.layer_types()[index]
            args, kwargs = replace_layer_inputs(args, kwargs, hidden, current.layer_inputs, layer_type)
        elif hidden is not original:  # merged features but nothing dropped
            args, kwargs = replace_hidden(args, kwargs, hidden)
        if index in self.capture_layers:
            current.captured.setdefault(index, {}).update(
                position_embeddings=kwargs["position_embeddings"], layout=current.layout
            )
        return args, kwargs

    def _capture_hook(self, index: int, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            current = self.current
            if current is not None and current.prefill:
                current.captured.setdefault(index, {})[kind] = output

        return hook

    def _observe_hook(self, index: int, part: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            current = self.current
            if current is None or not current.prefill:
                return
            inputs = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            result = output[0] if isinstance(output, tuple) else output
            with self._timed(current.record.overhead, "observe"):
                self.method.observe(current.state, index, part, inputs, result, current.layout)

        return hook

    # -- labels ------------------------------------------------------------------------------------------------
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
