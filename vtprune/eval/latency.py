"""Measured cost of a (wrapped or dense) model: vision encoder, prefill, decoding, memory, KV cache.

Every figure is the median of ``repeats`` runs after ``warmup`` runs, with its spread (min, max). On CUDA the timers
are CUDA events around the work (the host waits only at the end of a measurement); on CPU ``time.perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtprune.core.compat import output_cache


@dataclass
class Timing:
    """Milliseconds of repeated runs: median, fastest, slowest."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    @property
    def repeats(self) -> int:
        """How many timed runs the figures come from."""
        return len(self.samples)

    @property
    def spread(self) -> float:
        """``(max - min) / median``: how far repeated runs of identical work disagree (NaN under two runs, where
        nothing says how noisy the timer is)."""
        if len(self.samples) < 2 or self.median <= 0:
            return float("nan")
        return (self.high - self.low) / self.median


class Stopwatch:
    """Milliseconds of a block: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextmanager
    def time(self, into: list[float]) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            into.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            yield
            into.append((time.perf_counter() - begin) * 1e3)


@contextmanager
def module_timer(module: nn.Module, stopwatch: Stopwatch, into: list[float]) -> Iterator[None]:
    """Times every call of ``module`` while the block runs (summed per call into ``into``)."""
    starts: list[Any] = []

    def before(*_: Any) -> None:
        if stopwatch.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            starts.append(event)
        else:
            starts.append(time.perf_counter())

    def after(*_: Any) -> None:
        begin = starts.pop()
        if stopwatch.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            into.append(begin.elapsed_time(end))
        else:
            into.append((time.perf_counter() - begin) * 1e3)

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's keys and values (per layer lengths may differ after pruning)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def timing_fields(name: str, timing: Timing) -> dict[str, float | None]:
    """``{name: median, name_min, name_max, name_spread}``: how a timing is written into a report row (an unknown
    spread, under two runs, as None: JSON readers other than Python's reject NaN)."""
    spread = timing.spread
    return {name: timing.median, f"{name}_min": timing.low, f"{name}_max": timing.high,
            f"{name}_spread": None if math.isnan(spread) else spread}  # fmt: skip


TIMINGS = ("vision_ms", "prefill_ms", "llm_prefill_ms", "decode_ms_per_token", "end_to_end_ms")


@dataclass
class Measurement:
    """One model on one batch: every time in ms; ``decode_tokens_per_s`` over the batch; memory in bytes."""

    vision_ms: Timing
    prefill_ms: Timing
    llm_prefill_ms: Timing
    decode_ms_per_token: Timing
    end_to_end_ms: Timing
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    batch: int
    new_tokens: int
    warmup: int | None = None  # untimed runs before the timed ones (None: not recorded)

    @property
    def decode_tokens_per_s(self) -> float:
        per_token = self.decode_ms_per_token.median
        return self.batch * 1e3 / per_token if per_token > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Each timing's median under its own name, with ``_min``, ``_max`` and ``_spread`` beside it;
        ``repeats`` / ``warmup`` say how many runs were timed and discarded."""
        out: dict[str, Any] = {"repeats": self.decode_ms_per_token.repeats, "warmup": self.warmup}
        for name in TIMINGS:
            out.update(timing_fields(name, getattr(self, name)))
        out.update(
            decode_tokens_per_s=self.decode_tokens_per_s,
            kv_cache_bytes=self.kv_cache_bytes,
            peak_memory_bytes=self.peak_memory_bytes,
            batch=self.batch,
            new_tokens=self.new_tokens,
        )
        return out


@torch.no_grad()
def measure(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    vision_tower: nn.Module,
    language_model: nn.Module,
    new_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    generate_kwargs: dict[str, Any] | None = None,
) -> Measurement:
    """Measure ``model`` (wrapped or not) on ``inputs``: prefill = one cached forward (time to first token),
    decoding = (generate(new_tokens) - generate(1)) / (new_tokens - 1)."""
    device = next(model.parameters()).device
    watch = Stopwatch(device)
    options = {"do_sample": False, **(generate_kwargs or {})}
    vision, prefill, llm, decode, total = [], [], [], [], []
    cache_bytes = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for run in range(warmup + repeats):
        keep = run >= warmup
        vision_run: list[float] = []
        llm_run: list[float] = []
        prefill_run: list[float] = []
        with module_timer(vision_tower, watch, vision_run), module_timer(language_model, watch, llm_run):
            with watch.time(prefill_run):
                output = model(**inputs, use_cache=True)
        cache_bytes = kv_cache_bytes(output_cache(output))
        first: list[float] = []
        with watch.time(first):
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **options)
        many: list[float] = []
        with watch.time(many):
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        if keep:
            vision.append(sum(vision_run))
            llm.append(sum(llm_run))
            prefill.append(prefill_run[0])
            total.append(many[0])
            decode.append((many[0] - first[0]) / max(new_tokens - 1, 1))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    return Measurement(
        Timing(vision), Timing(prefill), Timing(llm), Timing(decode), Timing(total), cache_bytes, peak, batch,
        new_tokens, warmup,
    )  # fmt: skip


@torch.no_grad()
def time_language_model(
    language_model: nn.Module, lengths: list[int], hidden: int, *, device: torch.device, dtype: torch.dtype,
    warmup: int = 1, repeats: int = 3,
) -> Timing:
    """The language model alone on prompts of ``lengths`` tokens (right-padded): a "born short" prefill to compare
    a pruned prefill with."""
    watch = Stopwatch(device)
    longest = max(lengths)
    embeds = torch.randn(len(lengths), longest, hidden, device=device, dtype=dtype)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    samples: list[float] = []
    for run in range(warmup + repeats):
        into: list[float] = [] if run < warmup else samples
        with watch.time(into):
            language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    return Timing(samples)

