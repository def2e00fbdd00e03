"""Scoring + selection overhead of every method, as a fraction of the dense prefill, on a LLaVA- or Qwen3-VL-shaped
model.

Each method runs wrapped with ``--keep`` (default 64 of 576, the budget papers report most). The engine times its
own work per forward (``ForwardRecord.overhead``: tower [CLS] rows, observers, recomputed attention rows, scores,
selection, bookkeeping); each repeat's overhead is divided by the dense prefill measured just before it (dense and
wrapped forwards alternate), and the table gives the median with min-max over repeats, flagging a row whose ratio
spread exceeds 20 % of its median. The difference of two end-to-end prefills is not used: on a shared CPU
its noise exceeds the overhead.

    python benchmarks/method_overhead.py [--repeats 7] [--keep 64] [--text-hidden 1024] [--text-layers 8] [--threads N]
        [--shape llava|qwen3_vl]

``--shape qwen3_vl``: a Qwen3-VL-8B-shaped model (16 px patches merged 2x2, deepstack after LLM layers 0-2,
interleaved M-RoPE) on one 448 px image (196 tokens between 35 + 20 text tokens).

The load average is printed after the warm-up and at the end. With torch's threads on every core, another busy
process makes the dense prefill and the overhead several times slower and the ratios noisy (on 2 cores, a test suite
running alongside took the 8-layer dense prefill from 0.85 s to 4.7 s); a load well above the benchmark's own thread
count means such a run's figures are not worth quoting.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import vtprune
from vtprune.testing import llava_shaped_batch, llava_shaped_model, qwen3_vl_shaped_batch, qwen3_vl_shaped_model

# a row whose overhead ratio moves by more than this fraction of its median between repeats is flagged
SPREAD_LIMIT = 0.2


def timed(model, batch) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**batch, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--text-hidden", type=int, default=1024)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--methods", default=",".join(vtprune.list_methods("llm")))
    parser.add_argument("--keep", type=float, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--shape", choices=("llava", "qwen3_vl"), default="llava", help="the model's shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console()
    vision_text = f"{args.text_layers} layers x {args.text_hidden}"
    if args.shape == "llava":
        model = llava_shaped_model(text_hidden=args.text_hidden, text_layers=args.text_layers)
        batch = llava_shaped_batch(model)
        vision = model.config.vision_config
        described = f"LLaVA-shaped model: CLIP {vision.num_hidden_layers} layers x {vision.hidden_size}, 576 image " \
                    f"tokens; Llama {vision_text}"  # fmt: skip
    else:
        model = qwen3_vl_shaped_model(text_hidden=args.text_hidden, text_layers=args.text_layers)
        batch = qwen3_vl_shaped_batch(model)
        vision = model.config.vision_config
        described = f"Qwen3-VL-shaped model: ViT {vision.depth} layers x {vision.hidden_size} (deepstack " \
                    f"{list(vision.deepstack_visual_indexes)}), 196 image tokens; Qwen3 {vision_text}"  # fmt: skip
    console.print(
        f"{described}; prompt {batch['input_ids'].shape[1]} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU"
    )
    timed(model, batch)  # warm-up
    console.print(
        f"conditions: {platform.processor() or platform.machine()}, python {platform.python_version()}, one dense "
        f"warm-up, then per method one warm-up and {args.repeats} repeats of (dense, wrapped) alternating; "
        f"{_load()}"
    )
    keep = int(args.keep) if args.keep >= 1 else args.keep
    table = Table(title=f"vtprune overhead per prefill at keep = {keep} ({args.repeats} repeats: median, min-max)")
    columns = ("method", "dense prefill ms", "overhead ms", "of which (ms, medians)", "overhead / dense prefill",
               "spread")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    flagged = []
    for name in args.methods.split(","):
        dense, overhead, parts = [], [], {}
        try:
            pruning = vtprune.wrap(model, name, keep=keep)
        except ValueError as error:  # a method that does not apply to this model says why (e.g. downsample)
            console.print(f"[dim]{name}: skipped ({str(error).split(';')[0]})[/dim]")
            continue
        with pruning:
            timed(model, batch)  # warm-up of this method's path
        for _ in range(args.repeats):
            dense.append(timed(model, batch))
            with vtprune.wrap(model, name, keep=keep) as pruning:
                timed(model, batch)
                overhead.append(sum(pruning.last.overhead.values()))
                for key, seconds in pruning.last.overhead.items():
                    parts.setdefault(key, []).append(seconds)
        ratios = [spent / base for spent, base in zip(overhead, dense)]  # each repeat against its own dense run
        ratio = statistics.median(ratios)
        spread = (max(ratios) - min(ratios)) / ratio if ratio > 0 else 0.0
        noisy = spread > SPREAD_LIMIT
        if noisy:
            flagged.append(name)
        split = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in sorted(parts.items()))
        row = (
            name,
            _ms(dense, 0),
            _ms(overhead, 1),
            split,
            f"{ratio:.2%} ({min(ratios):.2%}-{max(ratios):.2%})",
            f"{spread:.0%}" + (" noisy" if noisy else ""),
        )
        console.print("  ".join(f"{column}: {value}" for column, value in zip(columns, row)))  # as it goes
        table.add_row(*row)
    console.print(table)
    console.print(f"after the run: {_load()}")
    if flagged:
        console.print(
            f"[yellow]{', '.join(flagged)}: the overhead ratio varied by more than {SPREAD_LIMIT:.0%} of its median "
            "between repeats; rerun on a quieter machine or with more --repeats before quoting it[/yellow]"
        )


def _load() -> str:
    """The 1 / 5 / 15-minute load averages against the core count (other processes competing for the cores)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def _ms(seconds: list[float], digits: int) -> str:
    """Median (min-max) in milliseconds."""
    low, mid, high = (value * 1e3 for value in (min(seconds), statistics.median(seconds), max(seconds)))
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


if __name__ == "__main__":
    main()
