"""Realized vs FLOPs-predicted prefill speed-up, and pruned vs born-short prefill, for every method at one budget.

On a LLaVA-shaped random model big enough to time on a CPU (CLIP 6 x 256 at 336 px -> 576 image tokens, Llama
8 x 1024), each registered method that applies runs at ``--keep`` (default 64) inside one process, next to the dense
model:

* realized / predicted: (dense prefill time / pruned prefill time) / (dense prefill FLOPs / pruned prefill FLOPs).
  1.0 means the FLOPs cut turns fully into time; the vision tower, which no LLM-side method shrinks, is in both.
* pruned / born-short: the language model's prefill time inside the pruned forward (hooks, scoring, gathers
  included) over the same language model fed only the finally kept tokens from the start. For pre-LLM methods
  this is vtprune's own overhead; for in-LLM methods it also contains the layers that still see every token.
* ceiling: realized / predicted of the born-short language model (fed the final tokens from the start) against the
  dense one, LLM time and LLM FLOPs only: how much of a FLOPs cut this hardware turns into time at these sizes even with no pruning machinery. On a
  CPU small matrix products run at a lower rate than large ones, so this is below 1 and bounds the first column.

    python benchmarks/prefill.py [--keep 64] [--repeats 3] [--text-layers 8]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import vtprune
from vtprune.eval.flops import model_shape
from vtprune.eval.report import build_report
from vtprune.testing import llava_shaped_batch, llava_shaped_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--methods", default=None, help="comma-separated; default: every method that applies")
    args = parser.parse_args()

    model = llava_shaped_model(text_layers=args.text_layers)
    batch = llava_shaped_batch(model)
    names = args.methods.split(",") if args.methods else vtprune.list_methods("llm")
    methods = []
    for name in names:
        try:
            vtprune.wrap(model, name, keep=args.keep).unwrap()
            methods.append(name)
        except ValueError as error:
            Console().print(f"[dim]{name}: skipped ({str(error).split(';')[0]})[/dim]")
    with Progress() as progress:
        report = build_report(
            model, batch, methods, [args.keep], new_tokens=2, repeats=args.repeats, progress=progress,
        )  # fmt: skip
    table = Table(title=f"prefill at keep={args.keep} ({torch.get_num_threads()} CPU threads, medians)")
    for column in ("method", "LLM tokens/layer", "prefill TFLOPs", "prefill ms", "predicted speed-up",
                   "realized speed-up", "realized / predicted", "pruned / born-short", "ceiling"):  # fmt: skip
        table.add_column(column, justify="right")
    dense = report.rows[0]
    language = model_shape(model).language
    text_tokens = dense["llm_tokens"] - dense["visual_tokens"]

    def born_short_flops(row: dict) -> float:  # every layer at the final token count
        final = int(text_tokens + row["visual_tokens"])
        return language.layers * language.layer_flops(final, final)

    for row in report.rows:
        llm_realized = dense["llm_prefill_ms"] / row["born_short_llm_ms"]
        llm_predicted = born_short_flops(dense) / born_short_flops(row)
        table.add_row(
            row["method"],
            f"{row['llm_tokens']:.0f}",
            f"{row['tflops_prefill']:.3f}",
            f"{row['prefill_ms']:.0f}",
            f"{row.get('predicted_speedup', 1.0):.2f}x",
            f"{row.get('realized_speedup', 1.0):.2f}x",
            f"{row.get('speedup_vs_predicted', 1.0):.2f}",
            f"{row['pruned_vs_born_short']:.2f}",
            f"{llm_realized / llm_predicted:.2f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table)


if __name__ == "__main__":
    main()
