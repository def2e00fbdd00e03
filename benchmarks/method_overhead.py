"""Scoring + selection overhead of every method, as a fraction of the dense prefill, on a LLaVA-shaped model.

Each method runs wrapped with ``--keep`` (default 64 of 576, the budget papers report most). The engine times its
own work per forward (``ForwardRecord.overhead``: tower [CLS] rows, observers, recomputed attention rows, scores,
selection, bookkeeping); that is divided by the dense prefill time measured in the same run (dense and wrapped
forwards alternate; medians over repeats). The difference of two end-to-end prefills is not used: on a shared CPU
its noise exceeds the overhead.

    python benchmarks/method_overhead.py [--repeats 7] [--keep 64] [--text-hidden 1024] [--text-layers 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import vtprune
from vtprune.testing import llava_shaped_batch, llava_shaped_model


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
    args = parser.parse_args()

    model = llava_shaped_model(text_hidden=args.text_hidden, text_layers=args.text_layers)
    batch = llava_shaped_batch(model)
    console = Console()
    console.print(
        f"LLaVA-shaped model: CLIP {model.config.vision_config.num_hidden_layers} layers x "
        f"{model.config.vision_config.hidden_size}, 576 image tokens; Llama {args.text_layers} layers x "
        f"{args.text_hidden}; prompt {batch['input_ids'].shape[1]} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU"
    )
    timed(model, batch)  # warm-up
    keep = int(args.keep) if args.keep >= 1 else args.keep
    table = Table(title=f"vtprune overhead per prefill at keep = {keep} (median of {args.repeats} repeats)")
    columns = ("method", "dense prefill ms", "overhead ms", "of which (ms)", "overhead / dense prefill")
    for column in columns:
        table.add_column(column, justify="right")
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
        base, spent = statistics.median(dense), statistics.median(overhead)
        split = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in sorted(parts.items()))
        table.add_row(
            name,
            f"{base * 1e3:.0f}",
            f"{spent * 1e3:.1f}",
            split,
            f"{spent / base:.2%}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
