"""DToP: forward time of the shipped digit-scene segmenter at several exit thresholds, next to dense (thresh 1.0).

Times are medians of forwards alternating dense / thresholded in one run (same load for both), batched as a user
would run it (so padded rows are computed too); FLOPs come from FlopCounterMode on the same batched forward.

    python benchmarks/dtop.py [--batch 32] [--repeats 5] [--thresholds 0.99,0.95,0.9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from vtprune.data.digit_scenes import scenes
from vtprune.embedded.segmenter import load_segmenter, to_tensor


def run(model: torch.nn.Module, images: torch.Tensor, thresh: float) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(images, thresh=thresh)
    return time.perf_counter() - start


def flops(model: torch.nn.Module, images: torch.Tensor, thresh: float) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, thresh=thresh)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--thresholds", default="0.99,0.95,0.9")
    args = parser.parse_args()
    model = load_segmenter()
    images = to_tensor(scenes("test", 0, args.batch, seed=1000)[0])
    dense_flops = flops(model, images, 1.0)
    run(model, images, 1.0)  # warm-up
    table = Table(title=f"DToP segmenter, batch {args.batch}, {torch.get_num_threads()} threads")
    for column in ("thresh", "rows in last block (mean)", "FLOPs vs dense", "time vs dense"):
        table.add_column(column, justify="right")
    table.add_row("1.0 (dense)", str(model.embed(images[:1]).shape[1]), "1.00", "1.00")
    for thresh in (float(t) for t in args.thresholds.split(",")):
        with torch.no_grad():
            rows = model(images, thresh=thresh).rows[:, -1].float().mean()
        dense_times, exit_times = [], []
        for _ in range(args.repeats):
            dense_times.append(run(model, images, 1.0))
            exit_times.append(run(model, images, thresh))
        ratio = statistics.median(exit_times) / statistics.median(dense_times)
        table.add_row(f"{thresh:g}", f"{rows:.1f}", f"{flops(model, images, thresh) / dense_flops:.2f}", f"{ratio:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
