"""GPU benchmark in one command: real-size prefill speed-ups, TTFT, decode, memory and kernel bandwidth.

Random-weight full-size models (no download: latency needs no trained weights) are built directly on the GPU in
bf16 from :mod:`vtprune.eval.configs` (``llava-1.5-7b``; ``qwen2.5-vl-7b`` with one 1280 x 720 image if time allows),
fed one realistic prompt (system text, the image, a 40-token question and the assistant prefix) at batch 1 and 8,
and measured dense and under every registered method that applies, at keep = 64 / 128 / 192 (LLaVA) and 1/4, 1/9
(Qwen). Per row:

* prefill ms: one cached forward (``logits_to_keep=1``, as ``generate`` runs it), CUDA events, median of
  ``--repeats`` (default 10) after 2 warm-ups; the vision tower's and the language model's share from forwards timed
  per module (these synchronise between the two, so they are timed apart from the end-to-end prefill);
* predicted speed-up: dense over pruned prefill FLOPs (:func:`vtprune.eval.flops.prefill_flops` on the token counts
  the wrapped forward really used); realized speed-up (dense over pruned prefill ms) and realized / predicted;
* pruned / born-short: the language model's prefill in the pruned forward over the same language model fed only
  the finally kept tokens from the start (:func:`vtprune.eval.latency.time_language_model`, as ``vtprune report``);
  prefill / floor: the whole pruned prefill over (this row's vision tower ms + that born-short language model ms);
* overhead: vtprune's own time per forward (``pruning.last.overhead`` with ``synchronize_timers`` on, so it is
  device time), as a share of the dense prefill;
* TTFT (``generate`` of one token), decode tokens/s over 64 new tokens ((generate(64) - generate(1)) / 63 per step,
  times the batch), peak GPU memory of the row (the model's weights plus what the row allocated), KV-cache bytes after
  the prefill.

A dense 7B prefill at batch 1 is short enough on an H200 (about 9 TFLOPs) that the host launching the eager-mode
transformers layers may bound it rather than the GPU; the born-short floor shows how much of that a pruned prefill
can escape at all, and batch 8 shows the compute-bound side.

Methods that score by the LLM's own attention (FastV, PyramidDrop, SparseVLM, TransPrune, VisionDrop) are also run
as their authors run them, on the model switched to eager attention (their code reads attention maps, which SDPA
does not return), with the same method and budget: prefill ms of both and the overlap of the two selections (bf16
eager and SDPA round differently, so a near-tie can flip). The Triton ``gather_tokens`` / ``compact_kv`` /
``merge_tokens`` run against their torch references at N = 576 / 2,880, D = 4,096, bf16 (the cases of
``benchmarks/kernels.py``): GB/s, % of the H200's nominal 4.8 TB/s and of the measured copy bandwidth. Before any
model runs, a Triton preflight checks the three kernels against torch on small inputs: the engine gathers kept tokens
with Triton on CUDA, so if this machine's Triton cannot build them, the engine is switched to the torch path for the
run (said in the context and gpu.md) rather than every method row failing.

Safety: the plan and its time estimate print first; phases run most informative first (LLaVA at keep 64 at batch 1,
its eager references, the kernels, batch 8 at keep 64, batch 1's other budgets, Qwen at batch 1, decode of dense
and the quick methods, then the rest) and a phase's rows are skipped, marked as such,
once the estimate of the next row no longer fits in ``--budget`` seconds (default 400: the run ends inside 7
minutes, model construction included); a hard alarm shortly after the budget stops whatever runs and writes what was
measured. Every measurement sits in try/except: an error is recorded in its row and the run goes on. ``gpu.json``
is rewritten after every row; ``gpu.md`` and ``gpu.png`` after every phase and at the end.

``--tiny``: the same code path on the CPU (perf_counter instead of CUDA events) with tiny configs of the same
families (same token ids, patch geometry and 576 LLaVA image tokens; Qwen's image 448 x 252 px), batches 1 and 2,
3 repeats and 4 new tokens, in float32 (``--dtype bfloat16`` for the GPU's dtype); the Triton kernels run through
the interpreter (``TRITON_INTERPRET=1``) at small shapes. ``--quick``: methods fastv, pdrop,
visionzip, divprune and random, keep 64 (LLaVA) and 1/4 (Qwen).

    python benchmarks/gpu.py --out gpu-out [--quick] [--budget 400] [--tiny]
    bash benchmarks/gpu.sh --out "$OUT"      # on the GPU machine: installs the carried transformers wheel first

Choices that are ours: random token ids and pixels (latency does not depend on their values); the batch-8 prompts
have equal lengths (no padding), each its own text and pixels; decode is measured once per (method, batch) at the
smallest budget (64 / 1/9), because a 64-token generate costs as much as ~40 prefills and the
KV length is the only thing a method changes in decoding; tower-attention methods (VisionZip, VTC-CLS, ...) get no
eager reference (their authors read CLIP attention maps, a small part of the forward).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

START = time.monotonic()
HERE = Path(__file__).resolve().parent
NOMINAL_GBPS = 4800.0  # the H200's HBM3e bandwidth by its datasheet; the issue's goals are against it
QUICK_METHODS = ("fastv", "pdrop", "visionzip", "divprune", "random")
LLAVA_KEEPS = (64, 128, 192)
QWEN_KEEPS = ((0.25, "1/4"), (1 / 9, "1/9"))
FINAL_RESERVE_S = 15.0  # kept free at the end of the budget for writing gpu.md / gpu.png
HARD_GRACE_S = 25.0  # the alarm that stops a run past its budget fires this long after it


class TimeUp(BaseException):
    """Raised by the hard alarm; a BaseException so no per-row ``except Exception`` swallows it."""


# -- options ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes gpu.json, gpu.md and gpu.png into --out.",
    )  # fmt: skip
    parser.add_argument("--out", default="gpu-out", help="folder for gpu.json, gpu.md, gpu.png (created)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: the same code path in seconds")
    parser.add_argument("--quick", action="store_true", help=f"methods {','.join(QUICK_METHODS)}; one budget per model")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 400; tiny 120)")
    parser.add_argument("--models", default="llava,qwen", help="comma-separated: llava, qwen (default both)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: every registered one)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; tiny 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed prefills per row (default 10; tiny 3)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 64; tiny 4)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the Triton kernel phase")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="model dtype (default: bfloat16 on the GPU, float32 under --tiny)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, run nothing")
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (120.0 if args.tiny else 400.0)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8")).split(",")]
    args.repeats = args.repeats or (3 if args.tiny else 10)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 64)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in args.models:
        if model not in ("llava", "qwen"):
            parser.error(f"--models: unknown model {model!r}; choose from llava, qwen")
    if args.repeats < 1 or args.new_tokens < 2 or min(args.batches) < 1 or args.budget <= 0:
        parser.error("--repeats >= 1, --new-tokens >= 2, batches >= 1 and --budget > 0 are required")
    return args


# -- the clock -------------------------------------------------------------------------------------------------------


class Clock:
    """Wall time since the start against the budget; ``fits(seconds)`` says whether a step of that cost still fits
    before the reserve kept for the final files."""

    def __init__(self, budget: float) -> None:
        self.start = START  # the budget counts from the process start: imports and CUDA set-up included
        self.budget = budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left() - FINAL_RESERVE_S

    def arm(self) -> None:
        """A hard stop shortly after the budget: whatever runs then is interrupted and the results are written."""

        def stop(*_: Any) -> None:
            raise TimeUp(f"hard time limit ({self.budget + HARD_GRACE_S:.0f} s) reached")

        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, stop)
            signal.alarm(max(1, math.ceil(self.budget + HARD_GRACE_S - self.elapsed())))


# -- models and prompts ----------------------------------------------------------------------------------------------


def model_config(name: str, tiny: bool) -> Any:
    """The reference config of ``name`` ("llava": llava-1.5-7b, "qwen": qwen2.5-vl-7b), shrunk for ``--tiny``
    (same families, token ids and patch geometry; narrow and shallow)."""
    from vtprune.eval.configs import reference_config

    config = reference_config("llava-1.5-7b" if name == "llava" else "qwen2.5-vl-7b")
    if not tiny:
        return config
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 128, 4
    text.num_attention_heads = 4
    text.num_key_value_heads = 4 if name == "llava" else 2
    text.head_dim = 16
    vision = config.vision_config
    if name == "llava":
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = 32, 64, 3, 2
    else:
        vision.hidden_size, vision.intermediate_size, vision.depth, vision.num_heads = 32, 64, 4, 2
        vision.out_hidden_size = text.hidden_size
        vision.fullatt_block_indexes = [1, 3]
        rope = dict(getattr(text, "rope_parameters", None) or {})
        rope["mrope_section"] = [2, 3, 3]  # sums to head_dim / 2
        text.rope_parameters = rope
    return config


def build_model(name: str, tiny: bool, device: Any, dtype: Any) -> Any:
    """A random-weight model built in place on ``device`` in ``dtype`` (no CPU copy of the 7B weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    config = model_config(name, tiny)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def qwen_grid(height: int, width: int, factor: int) -> tuple[int, int]:
    """Qwen2.5-VL's processor resize (``smart_resize`` within its pixel limits): each side rounded to a multiple of
    patch x merge, returned in patches."""
    rows = max(factor, round(height / factor) * factor)
    cols = max(factor, round(width / factor) * factor)
    return rows, cols


def make_prompt(model: Any, name: str, batch: int, tiny: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs on the model's device, description): ``batch`` prompts of equal length, each its own random text and
    pixels: system text, the image, a 40-token question, an assistant prefix."""
    import torch

    config = model.config
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(batch)
    vocab = config.text_config.vocab_size

    def text(count: int) -> torch.Tensor:
        return torch.randint(3, min(vocab, 32000), (count,), generator=generator)

    rows, extra = [], {}
    if name == "llava":
        side = config.vision_config.image_size // config.vision_config.patch_size
        image = torch.full((side * side,), config.image_token_index)
        system, question, prefix = 35, 40, 5  # "A chat between ... USER:" / the question / " ASSISTANT:"
        for _ in range(batch):
            rows.append(torch.cat([torch.tensor([1]), text(system - 1), image, text(question), text(prefix)]))
        size = config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        described = {"image": f"{size} x {size} px", "image_tokens": side * side}
    else:
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        height, width = (252, 448) if tiny else (720, 1280)
        rows_px, cols_px = qwen_grid(height, width, factor)
        grid = (1, rows_px // vision.patch_size, cols_px // vision.patch_size)
        tokens = grid[1] * grid[2] // vision.spatial_merge_size**2
        image = torch.cat([torch.tensor([config.vision_start_token_id]), torch.full((tokens,), config.image_token_id),
                           torch.tensor([config.vision_end_token_id])])  # fmt: skip
        system, question, prefix = 20, 40, 5  # "<|im_start|>system ... user" / the question / "assistant" prefix
        for _ in range(batch):
            rows.append(torch.cat([text(system), image, text(question), text(prefix)]))
        patch_row = 3 * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(batch * grid[1] * grid[2], patch_row, generator=generator)
        extra["image_grid_thw"] = torch.tensor([grid] * batch)
        described = {"image": f"{width} x {height} px -> {cols_px} x {rows_px}", "image_tokens": tokens}
    input_ids = torch.stack(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels, **extra}
    if name == "qwen":
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    inputs = {k: v.to(parameter.device, dtype=parameter.dtype if v.is_floating_point() else v.dtype)
              for k, v in inputs.items()}  # fmt: skip
    described.update(prompt_tokens=input_ids.shape[1], text_tokens=input_ids.shape[1] - described["image_tokens"],
                     batch=batch)  # fmt: skip
    return inputs, described


# -- measurements ----------------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Bench:
    """One model on one device: timed forwards, generate, born-short, FLOPs; every figure in ms or bytes."""

    def __init__(self, model: Any, name: str, plan: argparse.Namespace) -> None:
        import torch

        import vtprune
        from vtprune.eval.flops import model_shape
        from vtprune.eval.latency import Stopwatch

        self.model, self.name, self.plan = model, name, plan
        self.parameter = next(model.parameters())
        self.device = self.parameter.device
        self.cuda = self.device.type == "cuda"
        self.watch = Stopwatch(self.device)
        self.adapter = vtprune.adapter_for(model)
        self.shape = model_shape(model)
        self.torch = torch
        self.warmup = 1 if plan.tiny else 2
        self.side = 1 if plan.tiny else 2  # forwards for the module split, the overhead and TTFT (each a median)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def forward(self, inputs: dict[str, Any]) -> Any:
        return self.model(**inputs, use_cache=True, logits_to_keep=1)

    def prefill(self, inputs: dict[str, Any], repeats: int) -> list[float]:
        for _ in range(self.warmup):
            self.forward(inputs)
        samples: list[float] = []
        for _ in range(repeats):
            with self.watch.time(samples):
                self.forward(inputs)
        return samples

    def split(self, inputs: dict[str, Any]) -> tuple[float, float]:
        """(vision tower ms, language model ms) per forward, medians."""
        from vtprune.eval.latency import module_timer

        vision, language = [], []
        for _ in range(self.side):
            vision_run: list[float] = []
            language_run: list[float] = []
            with (
                module_timer(self.adapter.vision_tower(), self.watch, vision_run),
                module_timer(self.adapter.language_model, self.watch, language_run),
            ):
                self.forward(inputs)
            vision.append(sum(vision_run))
            language.append(sum(language_run))
        return median(vision), median(language)

    def generate(self, inputs: dict[str, Any], tokens: int) -> float:
        samples: list[float] = []
        with self.watch.time(samples):
            self.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return samples[0]

    def born_short(self, lengths: list[int]) -> float:
        from vtprune.eval.latency import time_language_model

        return time_language_model(
            self.adapter.language_model, lengths, self.shape.language.hidden, device=self.device,
            dtype=self.parameter.dtype, warmup=self.warmup, repeats=self.plan.repeats,
        ).median  # fmt: skip

    def flops(self, record: Any, batch: int) -> Any:
        from vtprune.eval.flops import prefill_flops

        return prefill_flops(self.model, record, record.encoder_inputs, logits_rows=[1] * batch)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = self.torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        """This model's weights plus what the row allocated on top of everything resident when it began (so the
        other model, resident too once Qwen is built, is not counted)."""
        if not self.cuda:
            return None
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return int(self.torch.cuda.max_memory_allocated(self.device) - self.resident + weights)


def method_kind(model: Any, method: str, keep: Any) -> dict[str, Any]:
    """Where ``method`` prunes on ``model`` at ``keep`` and whether it scores by the LLM's attention (ValueError
    where it does not apply)."""
    import vtprune
    from vtprune.api import checked_stages, model_info
    from vtprune.core.budget import validate_keep
    from vtprune.core.registry import make_method

    if vtprune.method_kind(method) == "vit":  # a ViT method wrapped inside the VLM reduces the tower's own rows
        vtprune.wrap(model, method, keep=keep).unwrap()  # raises where it cannot reduce this model's tower
        return {"stage_layers": ["tower"], "pre_llm": True, "llm_attention": False}
    info = model_info(vtprune.adapter_for(model))
    config = make_method(method)
    stages = checked_stages(config, config.stages(info, validate_keep(keep)), info)
    return {
        "stage_layers": [s.layer for s in stages],
        "pre_llm": all(s.layer is None for s in stages),
        "llm_attention": any(s.attention_from is not None for s in stages),
    }


def kept_lists(record: Any) -> list[list[int]]:
    """The finally kept visual tokens of each sample (original numbering)."""
    if record is None or not record.stages:
        return []
    return [k.tolist() for k in record.stages[-1].kept]


def measure_row(bench: Bench, inputs: dict[str, Any], method: str | None, keep: Any, dense: dict | None) -> dict:
    """Dense (``method=None``) or one wrapped method at ``keep``: every figure but decode (see :func:`measure_decode`)."""
    import vtprune
    from vtprune.core.compat import output_cache
    from vtprune.eval.latency import kv_cache_bytes

    model, plan = bench.model, bench.plan
    batch = inputs["input_ids"].shape[0]
    row: dict[str, Any] = {"model": bench.name, "batch": batch, "method": method or "dense"}
    began = time.monotonic()
    bench.reset_peak()
    if method is None:
        with vtprune.wrap(model, "random", keep=1.0) as probe:  # nothing dropped: the dense token counts
            bench.forward(inputs)
            record = probe.last
        pruning = None
    else:
        pruning = vtprune.wrap(model, method, keep=keep)
    try:
        samples = bench.prefill(inputs, plan.repeats)
        # per step as well as the row's peak, so a memory outlier says which step allocated it
        peaks = {"prefill": bench.peak()}
        output = bench.forward(inputs)
        row["kv_cache_bytes"] = kv_cache_bytes(output_cache(output))
        del output
        if pruning is not None:
            record = pruning.last
        row["vision_ms"], row["llm_prefill_ms"] = bench.split(inputs)
        if pruning is not None:
            pruning.synchronize_timers = True
            overheads = []
            for _ in range(bench.side):
                bench.forward(inputs)
                overheads.append(sum(pruning.last.overhead.values()) * 1e3)
            pruning.synchronize_timers = False
            row["overhead_ms"] = median(overheads)
        peaks["split_and_overhead"] = bench.peak()
        bench.generate(inputs, 1)  # generate's own warm-up (cache classes, logits processors)
        row["ttft_ms"] = median([bench.generate(inputs, 1) for _ in range(bench.side)])
        row["peak_memory_bytes"] = peaks["generate"] = bench.peak()
        row["peak_bytes_by_step"] = peaks  # cumulative: each is the peak from the row's start to that step
    finally:
        if pruning is not None:
            pruning.unwrap()
    row.update(prefill_ms=median(samples), prefill_ms_min=min(samples), prefill_ms_max=max(samples))
    row["kept"] = kept_lists(record) if method is not None else []
    final = record.stages[-1].kept if record.stages else None
    visual = [k.numel() for k in final] if final is not None else [item["num_tokens"] for item in record.items]
    row["visual_tokens"] = sum(visual) / max(len(visual), 1)  # per prompt (one image each)
    layers = record.tokens_per_layer
    row["llm_tokens"] = sum(sum(counts) / len(counts) for counts in layers) / len(layers)
    row["final_tokens"] = list(layers[-1])
    flops = bench.flops(record, batch)
    row.update(tflops_prefill=flops.prefill / 1e12, tflops_llm=flops.llm / 1e12, tflops_vision=flops.vision / 1e12)
    row["born_short_llm_ms"] = bench.born_short(list(layers[-1]))
    row["pruned_vs_born_short"] = row["llm_prefill_ms"] / row["born_short_llm_ms"]
    row["prefill_vs_floor"] = row["prefill_ms"] / (row["vision_ms"] + row["born_short_llm_ms"])
    if dense is not None:
        row["predicted_speedup"] = dense["tflops_prefill"] / row["tflops_prefill"]
        row["realized_speedup"] = dense["prefill_ms"] / row["prefill_ms"]
        row["realized_vs_predicted"] = row["realized_speedup"] / row["predicted_speedup"]
        if "overhead_ms" in row:
            row["overhead_share"] = row["overhead_ms"] / dense["prefill_ms"]
    row["wall_s"] = time.monotonic() - began
    return row


def measure_decode(bench: Bench, inputs: dict[str, Any], method: str | None, keep: Any) -> dict:
    """Decode tokens/s over ``new_tokens`` ((generate(n) - generate(1)) / (n - 1) per step, times the batch)."""
    import vtprune

    tokens = bench.plan.new_tokens
    batch = inputs["input_ids"].shape[0]
    pruning = vtprune.wrap(bench.model, method, keep=keep) if method else None
    try:
        bench.generate(inputs, 2)  # warm-up of the decode path
        first = bench.generate(inputs, 1)  # TTFT again, next to the long generate: their difference is decoding
        total = bench.generate(inputs, tokens)
    finally:
        if pruning is not None:
            pruning.unwrap()
    per_token = (total - first) / (tokens - 1)
    return {
        "generate_ms": total,
        "decode_ms_per_token": per_token,
        "decode_tokens_per_s": batch * 1e3 / per_token if per_token > 0 else float("nan"),
    }


def measure_eager(bench: Bench, inputs: dict[str, Any], method: str | None, keep: Any, sdpa: dict) -> dict:
    """The same method and budget on the model switched to eager attention (as attention-map code runs it)."""
    import vtprune

    model = bench.model
    model.set_attn_implementation("eager")
    pruning = None
    try:
        pruning = vtprune.wrap(model, method, keep=keep) if method else None
        samples = bench.prefill(inputs, bench.plan.repeats)
        kept = kept_lists(pruning.last) if pruning is not None else []
    finally:
        if pruning is not None:
            pruning.unwrap()
        model.set_attn_implementation("sdpa")
    row = {
        "model": bench.name, "batch": inputs["input_ids"].shape[0], "method": method or "dense", "keep": keep,
        "sdpa_prefill_ms": sdpa["prefill_ms"], "eager_prefill_ms": median(samples),
    }  # fmt: skip
    row["eager_vs_sdpa"] = row["eager_prefill_ms"] / row["sdpa_prefill_ms"]
    if kept and sdpa.get("kept"):
        shared = sum(len(set(a) & set(b)) for a, b in zip(kept, sdpa["kept"]))
        row["same_selection"] = shared / max(sum(len(b) for b in sdpa["kept"]), 1)
    return row


# -- kernels ---------------------------------------------------------------------------------------------------------


def load_kernel_bench() -> Any:
    """benchmarks/kernels.py as a module (loaded by path: a top-level ``kernels`` module would shadow the HF
    ``kernels`` package that transformers probes for)."""
    spec = importlib.util.spec_from_file_location("vtprune_bench_kernels", HERE / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_cases(tiny: bool, dtype: Any, device: Any) -> Iterator[tuple]:
    """benchmarks/kernels.py's cases (N = 576 / 2880, K = 64 / 192 / 576, D = 4096); under --tiny three small ones
    (N = 576 -> K = 64, D = 64) for the interpreter."""
    import torch

    from vtprune.kernels import compact_kv, gather_tokens, merge_tokens

    if not tiny:
        yield from load_kernel_bench().cases(dtype, device)
        return
    size, hidden, rows, kept = torch.finfo(dtype).bits // 8, 64, 576, 64
    x = torch.randn(1, rows + 40, hidden, dtype=dtype, device=device)
    index = (torch.randperm(rows, device=device)[:kept].sort().values + 35)[None]
    yield ("gather_tokens", f"N={rows} K={kept} D={hidden}", 2 * kept * hidden * size + kept * 8,
           lambda: gather_tokens(x, index, backend="torch", check=False),
           lambda: gather_tokens(x, index, backend="triton", check=False))  # fmt: skip
    cache = torch.randn(1, 2, rows + 40, 16, dtype=dtype, device=device)
    yield ("compact_kv", f"N={rows} K={kept} H=2 d=16", 2 * 2 * kept * 16 * size + kept * 8,
           lambda: compact_kv(cache, index, backend="torch", check=False),
           lambda: compact_kv(cache, index, backend="triton", check=False))  # fmt: skip
    tokens = torch.randn(1, rows, hidden, dtype=dtype, device=device)
    dst = torch.randint(0, kept, (1, rows), device=device)
    weight = torch.rand(1, rows, device=device)
    yield ("merge_tokens", f"N={rows} -> K={kept} D={hidden}", rows * hidden * size + kept * hidden * size + rows * 12,
           lambda: merge_tokens(tokens, dst, weight, kept, backend="torch", check=False),
           lambda: merge_tokens(tokens, dst, weight, kept, backend="triton", check=False))  # fmt: skip


def copy_bandwidth(device: Any, tiny: bool, repeats: int) -> float:
    """GB/s of a device-to-device copy (bytes read + written): 512 MiB on the GPU, 8 MiB under --tiny."""
    import torch

    kernels = load_kernel_bench()
    source = torch.empty((4 if tiny else 256) * 2**20, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    seconds = kernels.measure(lambda: target.copy_(source), repeats, device)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


# -- results ---------------------------------------------------------------------------------------------------------


class Results:
    """Everything measured so far, written to ``out`` (gpu.json after every row; gpu.md / gpu.png on ``write``)."""

    def __init__(self, out: Path, context: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"context": context, "plan": [], "rows": [], "eager": [], "kernels": [],
                                     "skipped": [], "errors": [], "phases": {}}  # fmt: skip

    def save_json(self) -> None:
        path = self.out / "gpu.json"
        path.write_text(json.dumps(self.data, indent=1, default=_json_default))

    def error(self, where: str, error: BaseException) -> dict[str, Any]:
        entry = {"where": where, "error": f"{type(error).__name__}: {error}"[:500],
                 "trace": traceback.format_exc(limit=6)[-2000:]}  # fmt: skip
        self.data["errors"].append(entry)
        print(f"  ! {where}: {entry['error']}", flush=True)
        return entry

    def write(self, final: bool = False) -> None:
        self.data["context"]["elapsed_s"] = round(time.monotonic() - START, 1)
        self.data["context"]["finished"] = final
        self.save_json()
        try:
            (self.out / "gpu.md").write_text(markdown(self.data))
        except Exception as error:  # noqa: BLE001 - a report bug must not lose the JSON
            self.error("gpu.md", error)
            self.save_json()
        try:
            plot(self.data, self.out / "gpu.png")
        except Exception as error:  # noqa: BLE001
            self.error("gpu.png", error)
            self.save_json()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt(value: Any, spec: str = ".3g", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:{spec}}{suffix}"
    return f"{value}{suffix}"


ROW_COLUMNS = (
    ("method", "method", None), ("keep", "keep", None), ("visual_tokens", "visual tokens", ".0f"),
    ("llm_tokens", "LLM tokens / layer", ".0f"), ("prefill_ms", "prefill ms", ".2f"),
    ("predicted_speedup", "predicted speed-up", ".2f"), ("realized_speedup", "realized speed-up", ".2f"),
    ("realized_vs_predicted", "realized / predicted", ".2f"), ("pruned_vs_born_short", "pruned / born-short (LLM)", ".2f"),
    ("prefill_vs_floor", "prefill / floor", ".2f"), ("overhead_share", "overhead / dense prefill", ".2%"),
    ("ttft_ms", "TTFT ms", ".1f"), ("decode_tokens_per_s", "decode tok/s", ".0f"),
    ("peak_memory_gib", "peak GiB", ".1f"), ("kv_cache_mib", "KV MiB", ".1f"), ("error", "error", None),
)  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    derived = dict(row)
    if row.get("peak_memory_bytes") is not None:
        derived["peak_memory_gib"] = row["peak_memory_bytes"] / 2**30
    if row.get("kv_cache_bytes") is not None:
        derived["kv_cache_mib"] = row["kv_cache_bytes"] / 2**20
    derived["keep"] = row.get("keep_label", row.get("keep"))
    cells = []
    for key, _, spec in ROW_COLUMNS:
        value = derived.get(key)
        if key == "error" and value:
            value = str(value).split("\n")[0][:80]
        cells.append(_fmt(value, spec) if spec else _fmt(value))
    return cells


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def goals(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(goal, batch, verdict, evidence) for the issue's targets on LLaVA-1.5-7B at keep 64, per batch measured."""
    out = []
    for batch in sorted({r["batch"] for r in data["rows"] if r["model"] == "llava"}) or [1]:
        out += [(goal, str(batch), verdict, evidence) for goal, verdict, evidence in _goals(data, batch)]
    gather = [k for k in data["kernels"] if k["op"] == "gather_tokens" and k.get("triton_pct_nominal") is not None]
    ok = [k["triton_pct_nominal"] >= 0.8 for k in gather]
    out.append(("Triton gather >= 80 % of peak bandwidth (4.8 TB/s)", "-",
                "n/a (not measured)" if not ok else ("met" if all(ok) else f"missed by {ok.count(False)} of {len(ok)}"),
                ", ".join(f"{k['shape']}: {k['triton_pct_nominal']:.0%}" for k in gather)))  # fmt: skip
    return out


def _goals(data: dict[str, Any], batch: int) -> list[tuple[str, str, str]]:
    rows = [r for r in data["rows"] if r["model"] == "llava" and r["batch"] == batch and "error" not in r]
    at64 = [r for r in rows if r.get("keep") == 64]
    pre = [r for r in at64 if r.get("pre_llm")]
    out = []

    def verdict(ok: list[bool]) -> str:
        return "n/a (not measured)" if not ok else ("met" if all(ok) else f"missed by {ok.count(False)} of {len(ok)}")

    out.append(("pre-LLM methods' prefill >= 3.0x dense at keep 64", verdict([r["realized_speedup"] >= 3.0 for r in pre]),
                ", ".join(f"{r['method']} {r['realized_speedup']:.2f}x" for r in pre)))  # fmt: skip
    out.append(("pre-LLM prefill <= 1.05x the born-short floor", verdict([r["prefill_vs_floor"] <= 1.05 for r in pre]),
                ", ".join(f"{r['method']} {r['prefill_vs_floor']:.2f}" for r in pre)))  # fmt: skip
    out.append(("realized >= 0.9x FLOPs-predicted (pre-LLM)", verdict([r["realized_vs_predicted"] >= 0.9 for r in pre]),
                ", ".join(f"{r['method']} {r['realized_vs_predicted']:.2f}" for r in pre)))  # fmt: skip
    over = [r for r in at64 if "overhead_share" in r]
    out.append(("each method's overhead <= 2 % of dense prefill", verdict([r["overhead_share"] <= 0.02 for r in over]),
                ", ".join(f"{r['method']} {r['overhead_share']:.2%}" for r in over)))  # fmt: skip
    fastv = [e for e in data["eager"] if e["model"] == "llava" and e["batch"] == batch and e["method"] == "fastv"
             and "eager_vs_sdpa" in e]  # fmt: skip
    out.append(("vtprune FastV (SDPA) faster than the eager reference", verdict([e["eager_vs_sdpa"] > 1 for e in fastv]),
                ", ".join(f"eager / SDPA {e['eager_vs_sdpa']:.2f}" for e in fastv)))  # fmt: skip
    return out


def markdown(data: dict[str, Any]) -> str:
    context = data["context"]
    lines = [f"# vtprune GPU benchmark ({context.get('date', '')})", ""]
    lines.append(
        f"{context.get('device')}; torch {context.get('torch')}, transformers {context.get('transformers')}, "
        f"{context.get('dtype')}, random weights; {context.get('mode')}; {context.get('elapsed_s')} s of a "
        f"{context.get('budget_s')} s budget{'' if context.get('finished') else ' (partial: run still going or stopped)'}."
    )
    lines += ["", "Times are medians (CUDA events on GPU, perf_counter on CPU); see benchmarks/gpu.py for each column.", ""]
    for name, label in (("llava", "LLaVA-1.5-7B"), ("qwen", "Qwen2.5-VL-7B")):
        for batch in sorted({r["batch"] for r in data["rows"] if r["model"] == name}):
            rows = [r for r in data["rows"] if r["model"] == name and r["batch"] == batch]
            prompt = data["context"].get("prompts", {}).get(f"{name}/{batch}", {})
            lines += [f"## {label}, batch {batch}", ""]
            if prompt:
                described = (f"Prompt: {prompt.get('prompt_tokens')} tokens ({prompt.get('image_tokens')} image "
                             f"tokens, {prompt.get('image')}), per sample.")  # fmt: skip
                lines += [described, ""]
            lines += [_table([h for _, h, _ in ROW_COLUMNS], [_cells(r) for r in rows]), ""]
    if data["eager"]:
        lines += ["## Attention-score methods: vtprune (SDPA) vs the eager-attention reference", ""]
        cells = [[e["model"], str(e["batch"]), e["method"], _fmt(e.get("keep_label", e.get("keep"))),
                  _fmt(e.get("sdpa_prefill_ms"), ".2f"), _fmt(e.get("eager_prefill_ms"), ".2f"),
                  _fmt(e.get("eager_vs_sdpa"), ".2f"), _fmt(e.get("same_selection"), ".1%"),
                  _fmt(str(e.get("error", "")).split("\n")[0][:80] or None)] for e in data["eager"]]  # fmt: skip
        lines += [_table(["model", "batch", "method", "keep", "SDPA prefill ms", "eager prefill ms", "eager / SDPA",
                          "same selection", "error"], cells), ""]  # fmt: skip
    if data["kernels"]:
        bandwidth = data["context"].get("copy_gbps")
        lines += ["## Kernels: Triton vs torch reference", "",
                  f"Copy bandwidth measured: {_fmt(bandwidth, '.0f')} GB/s; nominal {NOMINAL_GBPS:.0f} GB/s.", ""]
        cells = [[k["op"], k["shape"], _fmt(k.get("torch_us"), ".1f"), _fmt(k.get("torch_gbps"), ".0f"),
                  _fmt(k.get("triton_us"), ".1f"), _fmt(k.get("triton_gbps"), ".0f"),
                  _fmt(k.get("triton_pct_nominal"), ".0%"), _fmt(k.get("triton_pct_copy"), ".0%"),
                  _fmt(k.get("torch_vs_triton"), ".2f"), _fmt(str(k.get("error", "")).split("\n")[0][:80] or None)]
                 for k in data["kernels"]]  # fmt: skip
        lines += [_table(["op", "shape", "torch us", "torch GB/s", "triton us", "triton GB/s", "% of 4.8 TB/s",
                          "% of copy", "torch / triton", "error"], cells), ""]  # fmt: skip
    lines += ["## Goals (LLaVA-1.5-7B, keep 64)", ""]
    if "tiny" in str(context.get("mode")):
        lines += ["(A --tiny CPU run: these verdicts only exercise the code; the goals are about the H200 run.)", ""]
    lines += [_table(["goal", "batch", "verdict", "measured"], [list(g) for g in goals(data)]), ""]
    if data["context"].get("triton_preflight"):
        lines += [f"Triton preflight: {data['context']['triton_preflight']}", ""]
    if data["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in data["skipped"]] + [""]
    if data["errors"]:
        lines += ["## Errors", ""] + [f"- {e['where']}: {e['error']}" for e in data["errors"]] + [""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Realized prefill speed-up against visual tokens kept, one line per method (vtprune's palette), per model and
    batch; the born-short floor (the fastest a pruned prefill at that count can be) and the FLOPs-predicted line of a
    pre-LLM cut, dense as the black star at 1x."""
    from matplotlib.figure import Figure

    from vtprune.eval.style import (
        DENSE_STYLE,
        budget_axis,
        method_styles,
        plain_numbers,
    )

    panels = [(m, b) for m in ("llava", "qwen") for b in sorted({r["batch"] for r in data["rows"] if r["model"] == m})]
    columns = min(max(len(panels), 1), 2)
    lines = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(5.2 * columns + 1.8, 4.2 * lines), layout="constrained")
    axes = list(figure.subplots(lines, columns, squeeze=False).flat)
    for spare in axes[max(len(panels), 1):]:
        spare.set_visible(False)
    methods = sorted({r["method"] for r in data["rows"] if r["method"] != "dense"})
    styles = method_styles(methods)
    labels = {"llava": "LLaVA-1.5-7B", "qwen": "Qwen2.5-VL-7B"}
    for axis, (name, batch) in zip(axes, panels):
        rows = [r for r in data["rows"] if r["model"] == name and r["batch"] == batch and "prefill_ms" in r]
        dense = next((r for r in rows if r["method"] == "dense"), None)
        xs = []
        for method in methods:
            points = sorted((r["visual_tokens"], r["realized_speedup"]) for r in rows
                            if r["method"] == method and "realized_speedup" in r)  # fmt: skip
            if points:
                axis.plot(*zip(*points), **styles[method].line(), label=method, markersize=5, linewidth=1.2)
                xs += [p[0] for p in points]
        floor = data.get("floors", {}).get(f"{name}/{batch}", [])
        if floor:
            floor = sorted(floor, key=lambda f: f["visual_tokens"])
            axis.plot([f["visual_tokens"] for f in floor], [f["speedup"] for f in floor], color="black", linewidth=2.0,
                      linestyle="-", marker="_", markersize=12, label="born-short floor")  # fmt: skip
            axis.plot([f["visual_tokens"] for f in floor], [f["predicted"] for f in floor], color="grey",
                      linewidth=1.6, linestyle=":", marker="x", markersize=6, label="FLOPs-predicted (pre-LLM)")  # fmt: skip
            xs += [f["visual_tokens"] for f in floor]
        if dense is not None:
            axis.scatter([dense["visual_tokens"]], [1.0], color=DENSE_STYLE.colour, marker="*", s=160, zorder=4,
                         label="dense")  # fmt: skip
            xs.append(dense["visual_tokens"])
        if xs:
            budget_axis(axis, xs)
        plain_numbers(axis.yaxis)
        axis.set_xlabel("visual tokens kept per image")
        axis.set_ylabel("prefill speed-up over dense (x)")
        axis.set_title(f"{labels[name]}, batch {batch}")
        axis.grid(alpha=0.3)
    if not panels:
        axes[0].text(0.5, 0.5, "no rows measured", ha="center", va="center", transform=axes[0].transAxes)
    handles, names = [], []
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in names:
                handles.append(handle)
                names.append(label)
    if handles:
        figure.legend(handles, names, loc="outside right center", fontsize=8)
    context = data["context"]
    figure.suptitle(f"vtprune prefill speed-up, {context.get('device')}, {context.get('dtype')}, random weights "
                    f"({context.get('date')})")  # fmt: skip
    figure.savefig(path, dpi=110)


# -- the run ---------------------------------------------------------------------------------------------------------


# (LLM parameters, tower FLOPs per image, dense image tokens, text tokens, launch-bound floor of one forward in s):
# HF decoders at batch 1 are launch-bound on an H200 (about 1 ms of host time per decoder layer with its tower)
SIZES = {"llava": (6.7e9, 0.35e12, 576, 80, 0.030), "qwen": (7.0e9, 7.0e12, 1196, 67, 0.040)}
GPU_RATE = 4.5e14  # bf16 FLOP/s a 7B prefill reaches (about 57 % of the 790 TFLOP/s measured on a large GEMM)


def forward_seconds(model: str, batch: int, visual: float, tiny: bool) -> float:
    """Estimated seconds of one prefill of ``batch`` prompts keeping ``visual`` image tokens each."""
    if tiny:  # a shared CPU: the tiny models' forwards cost about this much, mostly attention over the long prompt
        return (0.08 if model == "llava" else 0.05) * max(1.0, 0.7 * batch)
    parameters, tower, _, text, floor = SIZES[model]
    return max(floor, batch * (2 * parameters * (text + visual) + tower) / GPU_RATE)


def estimate_plan(plan: argparse.Namespace, methods: list[str]) -> list[tuple[str, int, float]]:
    """(phase, rows, estimated seconds) before anything ran, from :data:`SIZES` (a row: warm-up, timed, split,
    overhead and TTFT forwards plus as many born-short decoder runs). Once the dense rows ran, the guard uses measured
    row times instead."""
    rows = len(methods) + 1
    llava_keeps = LLAVA_KEEPS[:1] if plan.quick else LLAVA_KEEPS
    qwen_keeps = [k for k, _ in (QWEN_KEEPS[:1] if plan.quick else QWEN_KEEPS)]
    forwards = 2 + plan.repeats + 1 + 3 * (1 if plan.tiny else 2) + 1
    build = 1.0 if plan.tiny else 12.0

    def row(model: str, batch: int, visual: float) -> float:
        return 0.2 + forward_seconds(model, batch, visual, plan.tiny) * (forwards + 0.8 * (2 + plan.repeats))

    def rows_cost(model: str, batch: int, keeps: list[float]) -> float:
        image = SIZES[model][2]
        visual = [k if k >= 1 else k * image for k in keeps]
        return (rows - 1) * sum(row(model, batch, v) for v in visual)  # every method at every budget

    decode_step = 0.01 if plan.tiny else 0.025  # launch-bound, as the prefill floor
    first, rest = plan.batches[0], plan.batches[1:]
    others = list(llava_keeps[1:])
    quick = min(len(QUICK_METHODS), rows - 1) + 1
    out = []

    def decode(model: str, count: int) -> float:
        visual = 64 if model == "llava" else 133
        return count * ((plan.new_tokens + 3) * decode_step + 2 * forward_seconds(model, 1, visual, plan.tiny))

    def eager(model: str, batch: int) -> float:
        return 6 * 12 * 1.5 * forward_seconds(model, batch, 64 if model == "llava" else 299, plan.tiny)

    if "llava" in plan.models:
        out.append(("build llava", 1, build))
        out.append((f"llava batch {first} keep 64", rows, row("llava", first, 576) + rows_cost("llava", first, [64])))
        out.append((f"llava batch {first} eager references", 6, eager("llava", first)))
    if not plan.no_kernels:
        out.append(("kernels", 3 if plan.tiny else 18, 5.0 if plan.tiny else 20.0))
    if "llava" in plan.models:
        for batch in rest:
            cost = row("llava", batch, 576) + rows_cost("llava", batch, [64]) + eager("llava", batch)
            out.append((f"llava batch {batch} keep 64", rows + 6, cost))
        out.append((f"llava batch {first}, other budgets", (rows - 1) * len(others), rows_cost("llava", first, others)))
    if "qwen" in plan.models:
        out.append(("build qwen", 1, build * 1.2))
        cost = row("qwen", first, 1196) + rows_cost("qwen", first, qwen_keeps) + eager("qwen", first)
        out.append((f"qwen batch {first}", rows * len(qwen_keeps) + 6, cost))
    models = [m for m in ("llava", "qwen") if m in plan.models]
    count = quick * len(plan.batches) * len(models)
    out.append(("decode: dense and the quick methods", count, sum(decode(m, quick * len(plan.batches)) for m in models)))
    for batch in rest:
        if "llava" in plan.models:
            out.append((f"llava batch {batch}, other budgets", (rows - 1) * len(others),
                        rows_cost("llava", batch, others)))  # fmt: skip
    for batch in rest:
        if "qwen" in plan.models:
            cost = row("qwen", batch, 1196) + rows_cost("qwen", batch, qwen_keeps)
            out.append((f"qwen batch {batch}", rows * len(qwen_keeps), cost))
    count = (rows - quick) * len(plan.batches)
    out.append(("decode: the other methods", count * len(models), sum(decode(m, count) for m in models)))
    return out


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    if plan.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined: the CPU interpreter
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"vtprune GPU benchmark: budget {plan.budget:.0f} s, out {out}", flush=True)

    import torch
    import transformers

    import vtprune

    clock = Clock(plan.budget)
    cuda = torch.cuda.is_available() and not plan.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, plan.dtype) if plan.dtype else (torch.bfloat16 if cuda else torch.float32)
    if not cuda and not plan.tiny and not plan.dry_run:  # a dry run shows the full-size plan anywhere
        print("no CUDA device: running the --tiny configs instead (the full-size models need a GPU)", flush=True)
        plan.tiny = True
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # every registered method: LLM-side ones and the ViT ones that reduce a VLM's tower (FlowCut, EViT, ToMe on
    # LLaVA-1.5); each that does not apply to a model is skipped with its own reason
    names = plan.methods.split(",") if plan.methods else list(QUICK_METHODS if plan.quick else vtprune.list_methods())
    unknown = [n for n in names if n not in vtprune.list_methods()]
    if unknown:
        print(f"unknown methods: {', '.join(unknown)}; registered: {', '.join(vtprune.list_methods())}")
        return 2
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""), "mode": ("tiny" if plan.tiny else "full size") + (", quick" if plan.quick else ""),
        "budget_s": plan.budget, "repeats": plan.repeats, "new_tokens": plan.new_tokens, "batches": plan.batches,
        "methods": names, "prompts": {},
    }  # fmt: skip
    results = Results(out, context)
    results.data["floors"] = {}
    estimate = estimate_plan(plan, names)
    results.data["plan"] = [{"phase": p, "rows": n, "estimate_s": round(s, 1)} for p, n, s in estimate]
    total = sum(s for _, _, s in estimate)
    shown = "full-size plan, as on a GPU" if plan.dry_run and not plan.tiny else f"{context['device']}, {context['dtype']}"
    print(f"plan ({shown}, {len(names)} methods, batches {plan.batches}):", flush=True)
    for phase, count, seconds in estimate:
        print(f"  {phase:40s} {count:4d} rows  ~{seconds:6.0f} s", flush=True)
    print(f"estimated total ~{total:.0f} s against a budget of {plan.budget:.0f} s"
          + (": phases past the budget are skipped, most important first" if total > plan.budget else ""), flush=True)
    results.save_json()
    if plan.dry_run:
        return 0
    # everything the final files need is imported before the alarm is armed: an alarm inside a first import would
    # leave a half-initialised module behind for the final write
    import matplotlib.backends.backend_agg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    import vtprune.eval.style

    clock.arm()
    try:
        if cuda:
            triton_preflight(device, results)
        run(plan, names, device, dtype, clock, results)
    except TimeUp as error:
        results.data["skipped"].append(f"stopped: {error}")
        print(f"stopped: {error}", flush=True)
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        results.write(final=True)
    print(markdown(results.data), flush=True)
    print(f"wrote {out / 'gpu.json'}, {out / 'gpu.md'}, {out / 'gpu.png'} in {clock.elapsed():.0f} s", flush=True)
    return 0


def run(plan: argparse.Namespace, names: list[str], device: Any, dtype: Any, clock: Clock, results: Results) -> None:
    import torch

    data = results.data
    costs: dict[str, float] = {}  # measured seconds of one row, per "model/batch"; decode per "decode/batch"

    def attempt(where: str, step: Callable[[], dict[str, Any]], cost: float, into: list) -> dict[str, Any] | None:
        """Run one measurement if its estimated ``cost`` fits; record its row, or its skip, or its error."""
        if not clock.fits(cost):
            data["skipped"].append(f"{where}: ~{cost:.0f} s would not fit in the {clock.left():.0f} s left")
            print(f"  - skip {where} (~{cost:.0f} s, {clock.left():.0f} s left)", flush=True)
            return None
        try:
            row = step()
        except TimeUp:
            raise
        except Exception as error:  # noqa: BLE001 - recorded per row; the run goes on
            entry = results.error(where, error)
            row = {"error": entry["error"]}
            failed = True
        else:
            failed = False
        if failed:
            # the traceback's frames held the failed forward's tensors until the except block ended: free them now,
            # or one OOM (TransPrune at batch 8) makes every later row OOM too
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row.setdefault("where", where)
        into.append(row)
        results.save_json()
        return row

    def phase(name: str) -> Iterator[None]:
        return _phase(name, results, clock)

    models = {}
    if "llava" in plan.models:
        with phase("build llava"):
            began = time.monotonic()
            models["llava"] = build_model("llava", plan.tiny, device, dtype)
            data["context"]["build_llava_s"] = round(time.monotonic() - began, 1)
    llava_keeps = [(k, str(k)) for k in (LLAVA_KEEPS[:1] if plan.quick else LLAVA_KEEPS)]
    qwen_keeps = QWEN_KEEPS[:1] if plan.quick else QWEN_KEEPS
    inputs_cache: dict[tuple[str, int], dict] = {}
    dense_rows: dict[tuple[str, int], dict] = {}
    kinds: dict[tuple[str, str], dict | None] = {}

    def inputs_for(name: str, batch: int) -> dict[str, Any]:
        if (name, batch) not in inputs_cache:
            inputs, described = make_prompt(models[name], name, batch, plan.tiny)
            inputs_cache[(name, batch)] = inputs
            data["context"]["prompts"][f"{name}/{batch}"] = described
        return inputs_cache[(name, batch)]

    def kind(name: str, method: str, keep: Any) -> dict | None:
        """The method's stages on this model, or None (refusal recorded once) where it does not apply."""
        if (name, method) not in kinds:
            try:
                kinds[(name, method)] = method_kind(models[name], method, keep)
            except (ValueError, TypeError) as error:  # the method's own refusal, with its reason
                kinds[(name, method)] = None
                data["skipped"].append(f"{name}/{method}: does not apply ({str(error).split(';')[0][:160]})")
        return kinds[(name, method)]

    def row_cost(name: str, batch: int) -> float:
        return costs.get(f"{name}/{batch}", costs.get(f"{name}/1", 2.0) * max(1.0, 0.6 * batch))

    def dense(name: str, batch: int) -> dict | None:
        if (name, batch) not in dense_rows:
            bench = Bench(models[name], name, plan)
            inputs = inputs_for(name, batch)
            row = attempt(f"{name} batch {batch} dense", lambda: measure_row(bench, inputs, None, None, None),
                          row_cost(name, batch) * 1.5, data["rows"])  # fmt: skip
            if row is None or "error" in row:
                return None
            row["keep"] = None
            costs[f"{name}/{batch}"] = row["wall_s"]
            dense_rows[(name, batch)] = row
            floors(name, batch, bench, row)
        return dense_rows[(name, batch)]

    def floors(name: str, batch: int, bench: Bench, row: dict) -> None:
        """The born-short floor and FLOPs-predicted speed-up of a pre-LLM cut at each budget of the plot."""
        from vtprune.eval.flops import llm_flops

        described = data["context"]["prompts"][f"{name}/{batch}"]
        text, image = described["text_tokens"], described["image_tokens"]
        counts = [k for k, _ in llava_keeps] if name == "llava" else [max(1, int(image * k)) for k, _ in qwen_keeps]
        counts.append(image)  # every token: the dense end of both lines
        entries = []
        for count in counts:
            try:
                born = bench.born_short([text + count] * batch)
                layers, _, _ = llm_flops(bench.shape.language, [[text + count] * batch] * bench.shape.language.layers,
                                         [1] * batch)  # fmt: skip
                # dense FLOPs with the decoder's share replaced by every layer at the kept count (tower, projector
                # and LM head unchanged)
                dense_flops, dense_llm = row["tflops_prefill"] * 1e12, row["tflops_llm"] * 1e12
                predicted = dense_flops / (dense_flops - dense_llm + sum(layers))
                entries.append({"visual_tokens": count, "born_short_llm_ms": born,
                                "speedup": row["prefill_ms"] / (row["vision_ms"] + born), "predicted": predicted})  # fmt: skip
            except TimeUp:
                raise
            except Exception as error:  # noqa: BLE001
                results.error(f"{name} batch {batch} floor at {count}", error)
        data["floors"][f"{name}/{batch}"] = entries

    def method_rows(name: str, batch: int, keeps: list[tuple[Any, str]]) -> None:
        base = dense(name, batch)
        if base is None:
            data["skipped"].append(f"{name} batch {batch}: no dense row, so no method rows")
            return
        bench = Bench(models[name], name, plan)
        inputs = inputs_for(name, batch)
        for keep, label in keeps:
            for method in names:
                where = f"{name} batch {batch} {method} keep {label}"
                info = kind(name, method, keep)
                if info is None:
                    continue
                row = attempt(where, lambda m=method, k=keep: measure_row(bench, inputs, m, k, base), row_cost(name, batch),
                              data["rows"])  # fmt: skip
                if row is not None:
                    row.update(model=name, batch=batch, method=method, keep=keep, keep_label=label, **info)
                    if "wall_s" in row:  # the last method row predicts the next one better than the dense row
                        costs[f"{name}/{batch}"] = row["wall_s"]

    def eager_rows(name: str, batch: int, keep: Any, label: str) -> None:
        base = dense(name, batch)
        if base is None:
            return
        bench = Bench(models[name], name, plan)
        inputs = inputs_for(name, batch)
        targets: list[dict | None] = [base] + [
            r for r in data["rows"]
            if r.get("model") == name and r.get("batch") == batch and r.get("keep") == keep and r.get("llm_attention")
            and "error" not in r
        ]  # fmt: skip
        cost = row_cost(name, batch) * 0.8
        for sdpa in targets:
            method = None if sdpa is base else sdpa["method"]
            where = f"{name} batch {batch} eager {method or 'dense'}" + (f" keep {label}" if method else "")
            row = attempt(where, lambda m=method, s=sdpa: measure_eager(bench, inputs, m, keep if m else None, s), cost,
                          data["eager"])  # fmt: skip
            if row is not None:
                row.update(model=name, batch=batch, method=method or "dense", keep_label=label if method else None)

    def decode_rows(name: str, batch: int, keep: Any, chosen: Callable[[str], bool]) -> None:
        """Decode speed of the dense row and each ``chosen`` method's row at ``keep`` that has none yet."""
        rows = [r for r in data["rows"] if r.get("model") == name and r.get("batch") == batch
                and (r.get("keep") == keep or r["method"] == "dense") and "ttft_ms" in r and chosen(r["method"])
                and "generate_ms" not in r and "decode_error" not in r]  # fmt: skip
        if not rows:
            return
        bench = Bench(models[name], name, plan)
        inputs = inputs_for(name, batch)
        for row in rows:
            method = None if row["method"] == "dense" else row["method"]
            cost = costs.get(f"decode/{name}/{batch}", row["ttft_ms"] / 1e3 * (plan.new_tokens + 4))
            where = f"{name} batch {batch} decode {row['method']}" + (f" keep {row.get('keep_label')}" if method else "")
            began = time.monotonic()
            result: list[dict] = []
            got = attempt(where, lambda m=method, r=row: measure_decode(bench, inputs, m, r.get("keep")), cost,
                          result)  # fmt: skip
            if got is not None:
                got.pop("where", None)
                if "error" in got:
                    got = {"decode_error": got["error"]}
                row.update(got)
                costs[f"decode/{name}/{batch}"] = time.monotonic() - began
        results.save_json()

    # Phases, most informative per second first (each skips its rows once they no longer fit): the goals
    # (LLaVA at keep 64: batch 1, eager references, the kernels, batch 8), the plot's other budgets, Qwen's first
    # batch, decode for dense and the quick methods, then the rest. Both models stay resident once Qwen is built
    # (31 GiB of 139), so the order need not follow the models; peak memory is counted per row (see measure_row).
    first, rest = plan.batches[0], plan.batches[1:]
    if "llava" in plan.models:
        with phase(f"llava batch {first} keep 64"):
            method_rows("llava", first, llava_keeps[:1])
        with phase(f"llava batch {first} eager references"):
            eager_rows("llava", first, *llava_keeps[0])
    if not plan.no_kernels:
        with phase("kernels"):
            kernel_rows(plan, device, clock, results)
    if "llava" in plan.models:
        for batch in rest:
            with phase(f"llava batch {batch} keep 64"):
                method_rows("llava", batch, llava_keeps[:1])
                eager_rows("llava", batch, *llava_keeps[0])
        with phase(f"llava batch {first}, other budgets"):
            method_rows("llava", first, llava_keeps[1:])
    qwen = list(qwen_keeps)
    if "qwen" in plan.models:
        build_cost = data["context"].get("build_llava_s", 12.0) * 1.3 + 10
        if clock.fits(build_cost + 2 * costs.get(f"llava/{first}", 2.0)):
            with phase("build qwen"):
                began = time.monotonic()
                models["qwen"] = build_model("qwen", plan.tiny, device, dtype)
                data["context"]["build_qwen_s"] = round(time.monotonic() - began, 1)
        else:
            data["skipped"].append(f"qwen: no time left to build it and measure a row ({clock.left():.0f} s left)")
    if "qwen" in models:
        with phase(f"qwen batch {first}"):
            method_rows("qwen", first, qwen)
            eager_rows("qwen", first, *qwen[0])
    quick = {"dense", *QUICK_METHODS}
    with phase("decode: dense and the quick methods"):
        for name, keep in (("llava", llava_keeps[0][0]), ("qwen", qwen[-1][0])):
            if name in models:
                for batch in plan.batches:
                    decode_rows(name, batch, keep, lambda method: method in quick)
    if "llava" in plan.models:
        for batch in rest:
            with phase(f"llava batch {batch}, other budgets"):
                method_rows("llava", batch, llava_keeps[1:])
    if "qwen" in models:
        for batch in rest:
            with phase(f"qwen batch {batch}"):
                method_rows("qwen", batch, qwen)
    with phase("decode: the other methods"):
        for name, keep in (("llava", llava_keeps[0][0]), ("qwen", qwen[-1][0])):
            if name in models:
                for batch in plan.batches:
                    decode_rows(name, batch, keep, lambda method: method not in quick)


@contextmanager
def _phase(name: str, results: Results, clock: Clock) -> Iterator[None]:
    """A named phase: printed with its time, its wall seconds recorded, gpu.md / gpu.png rewritten at its end."""
    print(f"== {name} ({clock.elapsed():.0f} s elapsed, {clock.left():.0f} s left)", flush=True)
    began = time.monotonic()
    try:
        yield
    except TimeUp:
        raise
    except Exception as error:  # noqa: BLE001 - a phase that breaks outside a row (model build) is recorded
        results.error(f"phase {name}", error)
    finally:
        results.data["phases"][name] = round(time.monotonic() - began, 1)
    results.write()


def kernel_rows(plan: argparse.Namespace, device: Any, clock: Clock, results: Results) -> None:
    """Triton vs torch on each case: median us, GB/s, % of the nominal 4.8 TB/s and of the measured copy."""
    import torch

    import vtprune.kernels._triton as switch

    kernels = load_kernel_bench()
    repeats = 2 if plan.tiny else 50
    with_triton = triton_importable() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    try:
        results.data["context"]["copy_gbps"] = copy_bandwidth(device, plan.tiny, max(3, repeats // 5))
    except Exception as error:  # noqa: BLE001
        results.error("copy bandwidth", error)
    peak = results.data["context"].get("copy_gbps")
    dtype = torch.float32 if plan.tiny else torch.bfloat16
    # the kernels are timed even where the preflight switched the engine to torch: their errors belong in the table
    engine_choice = switch.triton_available
    switch.triton_available = ENGINE_TRITON.get("original", engine_choice)
    try:
        for case in kernel_cases(plan.tiny, dtype, device):
            kernel_row(case, device, clock, results, kernels, repeats, with_triton, peak)
    finally:
        switch.triton_available = engine_choice


def kernel_row(case: tuple, device: Any, clock: Clock, results: Results, kernels: Any, repeats: int,
               with_triton: bool, peak: float | None) -> None:  # fmt: skip
    op, shape, moved, torch_call, triton_call = case
    where = f"kernel {op} {shape}"
    if not clock.fits(3.0):
        results.data["skipped"].append(f"{where}: no time left")
        return
    row: dict[str, Any] = {"op": op, "shape": shape, "bytes": moved}
    try:
        reference = kernels.measure(torch_call, repeats, device)
        row.update(torch_us=reference * 1e6, torch_gbps=moved / reference / 1e9)
        if with_triton:
            expected, got = torch_call(), triton_call()
            row["max_abs_diff"] = float((expected.float() - got.float()).abs().max())
            kernel = kernels.measure(triton_call, repeats, device)
            bandwidth = moved / kernel / 1e9
            row.update(triton_us=kernel * 1e6, triton_gbps=bandwidth, triton_pct_nominal=bandwidth / NOMINAL_GBPS,
                       torch_vs_triton=reference / kernel)  # fmt: skip
            if peak:
                row["triton_pct_copy"] = bandwidth / peak
    except TimeUp:
        raise
    except Exception as error:  # noqa: BLE001
        row["error"] = results.error(where, error)["error"]
    results.data["kernels"].append(row)
    results.save_json()


ENGINE_TRITON: dict[str, Callable[[], bool]] = {}  # "original": vtprune's own check, kept when the engine is switched


def triton_importable() -> bool:
    """Whether triton imports (vtprune's own check, whatever the preflight switched the engine to)."""
    import vtprune.kernels._triton as switch

    return ENGINE_TRITON.get("original", switch.triton_available)()


def triton_preflight(device: Any, results: Results) -> None:
    """Each Triton op once against its torch reference on small CUDA inputs before any model runs. The engine
    gathers kept tokens with the Triton kernel on CUDA; if a kernel fails to build or disagrees on this machine's
    Triton, the engine is switched to the torch path for the whole run (recorded in the context) so the model rows
    still measure, and the kernel phase records the Triton error per op."""
    import torch

    import vtprune.kernels._triton as switch
    from vtprune.kernels import compact_kv, gather_tokens, merge_tokens

    if not triton_importable():
        results.data["context"]["triton_preflight"] = "triton does not import: the engine uses the torch path"
        return
    checks = []
    try:
        x = torch.randn(2, 300, 256, device=device, dtype=torch.bfloat16)
        index = torch.stack([torch.randperm(300, device=device)[:64].sort().values for _ in range(2)])
        checks.append(("gather_tokens", gather_tokens(x, index, backend="triton"), gather_tokens(x, index, backend="torch")))
        cache = torch.randn(2, 4, 300, 64, device=device, dtype=torch.bfloat16)
        checks.append(("compact_kv", compact_kv(cache, index, backend="triton"), compact_kv(cache, index, backend="torch")))
        dst = torch.randint(0, 64, (2, 300), device=device)
        weight = torch.rand(2, 300, device=device)
        checks.append(("merge_tokens", merge_tokens(x, dst, weight, 64, backend="triton"),
                       merge_tokens(x, dst, weight, 64, backend="torch")))  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        bad = [name for name, got, want in checks if not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)]
        if bad:
            raise RuntimeError(f"Triton disagrees with the torch reference: {', '.join(bad)}")
        results.data["context"]["triton_preflight"] = "ok: gather_tokens, compact_kv, merge_tokens match torch"
    except Exception as error:  # noqa: BLE001
        results.error("triton preflight", error)
        ENGINE_TRITON["original"] = switch.triton_available
        switch.triton_available = lambda: False  # the engine's "auto" backend now takes the torch path
        results.data["context"]["triton_preflight"] = (f"failed ({type(error).__name__}: {str(error)[:200]}): the "
                                                       "engine ran with the torch kernels")  # fmt: skip
    print(f"triton preflight: {results.data['context']['triton_preflight']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
