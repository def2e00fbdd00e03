"""What the vision encoder produced, noted per image as the wrapped model encodes it.

``generate()`` encodes images before it prefills, and a forward may hand in features encoded earlier, so the
engine cannot ask the encoder at prefill time. Instead the observer wraps the model's encoder methods
(``get_image_features``, ...) for the wrap's lifetime and notes, keyed by each image's output feature tensor: its
tower signals ([CLS] attention rows per layer, keys, pre-projector features), the grid it was re-encoded on (methods
that resample), and the tokens a reducing tower's rows stand on (ViT methods inside LLaVA). The prefill then looks
its chunks up by tensor identity (a weak reference tells a reused id apart).
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.core.adapter import Adapter, VisualChunk
from vtprune.core.engine.hooks import HookSet
from vtprune.core.registry import Stage
from vtprune.core.signals import (
    PIXELS,
    ImageSignals,
    align_image_signals,
    vit_cls_rows,
    vit_received,
)
from vtprune.core.vit import ViTPruning

# Images whose notes may wait for their prefill (generate() encodes images before prefilling).
PENDING_IMAGES = 128


@dataclass
class Encoded:
    """What one encoder call noted about one image's features."""

    signals: ImageSignals | None = None
    resampled_grid: tuple[int, int] | None = None  # (rows, cols) it was re-encoded on (Stage.resample)
    tower_tokens: Tensor | None = None  # the tokens a reducing tower's rows stand on (Stage.tower)


class VisionObserver:
    """Wraps the encoder methods and the tower's attention projections; see the module docstring."""

    def __init__(
        self,
        adapter: Adapter,
        stages: list[Stage],
        target_grid: Callable[[int, int], tuple[int, int]],
        tower: ViTPruning | None = None,
    ) -> None:
        self.adapter = adapter
        self.tower = tower
        self.target_grid = target_grid
        self.vision_layers = sorted({layer for s in stages for layer in s.vision_layers})
        # per tower layer, the (key, fn) of each map of its attention: received attention under the layer's index,
        # Stage.vision_maps under (layer, fn); Stage.pixel_maps' functions of the tower's pixel patches
        self._maps: dict[int, dict[Any, Callable[[Tensor, Tensor, float], Tensor]]] = {}
        for stage in stages:
            for layer in stage.vision_received:
                self._maps.setdefault(layer, {})[layer] = vit_received
            for layer, fn in stage.vision_maps:
                self._maps.setdefault(layer, {})[layer, fn] = fn
        self.received_layers = sorted(self._maps)
        self.pixel_maps = list(dict.fromkeys(fn for stage in stages for fn in stage.pixel_maps))
        self.active = any(s.needs_vision_call for s in stages)
        self.encoder_features = any(s.encoder_features for s in stages)
        self.resample = any(s.resample for s in stages)
        self._notes: OrderedDict[int, tuple[weakref.ref, Encoded]] = OrderedDict()
        # per tower layer, during one encoder call: [CLS] rows, the queries awaiting their keys, head-averaged keys
        self._rows: dict[int, Tensor] | None = None
        self._queries: dict[int, Tensor] = {}
        self._keys: dict[int, Tensor] = {}
        # per tower layer, during one encoder call: the attention each token receives; and that call's arguments
        self._received: dict[int, Tensor] = {}
        self._call: dict[str, Any] = {}
        # a reducing tower's placed features, by id: the tokens their rows stand on (during one encoder call)
        self._placed: dict[int, Tensor] = {}
        # what the tower encoded since the last prefill, per sequence (for the FLOPs record)
        self.tower_inputs: list[dict[str, Any]] = []
        # seconds spent on tower signals since the last prefill
        self.seconds = 0.0

    def install(self, hooks: HookSet) -> None:
        hooks.add(self.adapter.vision_tower().register_forward_pre_hook(self._on_tower_call, with_kwargs=True))
        if not self.active:
            return
        for index in self.vision_layers:
            attn = self.adapter.vision_attention(index)
            hooks.add(attn.q_proj.register_forward_hook(self._query_hook(index)))
            hooks.add(attn.k_proj.register_forward_hook(self._key_hook(index, attn)))
        for index in self.received_layers:
            attn = self.adapter.vision_attention(index)
            hooks.add(attn.register_forward_pre_hook(self._received_hook(index), with_kwargs=True))
        vlm = self.adapter.vlm
        for name in self.adapter.encoder_methods:
            if hasattr(vlm, name):
                hooks.patch(vlm, name, self._observed(getattr(vlm, name)))

    @property
    def tower_signals(self) -> bool:
        """True when a stage reads per-token tower signals ([CLS] rows, attention or pixel maps, encoder features)."""
        return bool(self.vision_layers or self.received_layers or self.pixel_maps or self.encoder_features)

    def clear(self) -> None:
        self._notes.clear()

    def lookup(self, features: Tensor) -> Encoded | None:
        """What was noted about the image whose encoder output is ``features`` (None: encoded elsewhere)."""
        entry = self._notes.get(id(features))
        if entry is None or entry[0]() is not features:
            return None
        return entry[1]

    def lookup_chunk(self, chunk: VisualChunk) -> Encoded | None:
        """:meth:`lookup` for a chunk, joining the notes of the encoder rows it was regrouped from (their tower
        signals, in order; regrouped chunks are never re-encoded or tower-reduced)."""
        if not chunk.parts:
            return self.lookup(chunk.features)
        notes = [self.lookup(part) for part in chunk.parts]
        if any(note is None for note in notes):
            return None
        signals = [note.signals for note in notes]
        return Encoded(signals=ImageSignals.cat(signals) if all(s is not None for s in signals) else None)

    def take_tower_inputs(self) -> list[dict[str, Any]]:
        taken, self.tower_inputs = self.tower_inputs, []
        return taken

    def take_seconds(self) -> float:
        taken, self.seconds = self.seconds, 0.0
        return taken

    # -- hooks -------------------------------------------------------------------------------------------------
    def _observed(self, encode: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(encode)

        def observed(*args: Any, **kwargs: Any) -> Any:
            call = self.adapter.bind_call(signature, args, kwargs)
            changes = None
            if self.resample:
                resampled = self.adapter.resample_images(call, self.target_grid)
                if resampled is not None:
                    call, changes = resampled
                    args, kwargs = (), call
            self._rows, self._queries, self._keys, self._received, self._call = {}, {}, {}, {}, call
            try:
                output = encode(*args, **kwargs)
            finally:
                rows, keys, received = self._rows, self._keys, self._received
                self._rows, self._queries, self._keys, self._received, self._call = None, {}, {}, {}, {}
            start = time.perf_counter()
            self._note_call(call, output, rows, keys, received, changes)
            self.seconds += time.perf_counter() - start
            return output

        return observed

    def _note_call(
        self,
        call: dict[str, Any],
        output: Any,
        rows: dict[int, Tensor],
        keys: dict[int, Tensor],
        received: dict[int, Tensor],
        changes: Any,
    ) -> None:
        if self.tower is not None:
            self._place_tower_rows(call, output)  # replaces output.pooler_output
        if getattr(output, "pooler_output", None) is None:
            return
        per_image = self.adapter.encoder_rows(output)
        notes = [Encoded() for _ in per_image]
        for note, change in zip(notes, changes or ()):
            if change is not None:
                note.resampled_grid = change[1]
        for note, features in zip(notes, per_image):
            note.tower_tokens = self._placed.pop(id(features), None) if self.tower is not None else None
        sources = self.adapter.image_sources(call, output)
        if sources is not None:
            states = self.adapter.encoder_states(call, output) if self.encoder_features else None
            cls_position = self.adapter.cls_position if states is not None else None
            aligned = align_image_signals(sources[0], sources[1], rows, states, keys, cls_position, received)
            for note, signals in zip(notes, aligned):
                note.signals = signals
        for dead in [key for key, (ref, _) in self._notes.items() if ref() is None]:
            del self._notes[dead]
        for features, note in zip(per_image, notes):
            # re-insert at the end: a freed tensor's id comes back, and the trim below drops the oldest
            self._notes.pop(id(features), None)
            self._notes[id(features)] = (weakref.ref(features), note)
        while len(self._notes) > PENDING_IMAGES:
            self._notes.popitem(last=False)

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
        self._placed = {}
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
            self._placed[id(full)] = tokens.sort().values
            placed.append(full)
        output.pooler_output = placed
        for entry in self.tower_inputs[-1:]:  # this call's (the tower's pre-hook added it)
            entry["block_rows"] = [*record.seq_lens, record.origin.shape[1]]
            entry["projected_rows"] = read

    def _on_tower_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # generate() encodes before prefill: keep what the tower saw for the next prefill's record
        self.tower_inputs.extend(self.adapter.tower_inputs(args, kwargs))
        if self._rows is not None and self.pixel_maps:
            start = time.perf_counter()
            with torch.no_grad():
                patches, leading = self.adapter.vision_pixel_patches(args, kwargs)
                for fn in self.pixel_maps:
                    values = torch.stack([fn(view) for view in patches])  # [views, patches]
                    values = F.pad(values, (leading, 0))  # rows without pixels ([CLS]) carry 0
                    self._received[PIXELS, fn] = self.adapter.vision_row_values(self._call, values.flatten())
            self.seconds += time.perf_counter() - start

    def _query_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._rows is not None:
                self._queries[index] = output

        return hook

    def _received_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._rows is None:
                return
            start = time.perf_counter()
            with torch.no_grad():
                segments, scale = self.adapter.vision_attention_segments(self._call, module, args, kwargs)
                for key, fn in self._maps[index].items():
                    values = torch.cat([fn(q, k, scale) for q, k in segments])
                    self._received[key] = self.adapter.vision_row_values(self._call, values)
            self.seconds += time.perf_counter() - start

        return hook

    def _key_hook(self, index: int, attn: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._rows is not None and index in self._queries:
                start = time.perf_counter()
                queries = self._queries.pop(index)
                self._rows[index] = vit_cls_rows(queries, output, attn.num_heads, attn.scale)
                self._keys[index] = output.unflatten(-1, (attn.num_heads, -1)).mean(2)  # head-averaged
                self.seconds += time.perf_counter() - start

        return hook
