"""ViT-side reduction: forward time and FLOPs of a timm / open_clip tower, dense and wrapped, side by side.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the same forward (SDPA included); times are medians
of alternating dense / wrapped forwards in one run, so the ratio is measured under the same load.

    python benchmarks/vit.py [--model vit_base_patch16_224] [--batch 8] [--repeats 5] [--keep 98,49]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import vtprune


def tower(name: str) -> torch.nn.Module:
    if name.startswith("open_clip:"):
        import open_clip

        return open_clip.create_model(name.split(":", 1)[1], pretrained=None).visual.eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm name or open_clip:<name>")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="tome,evit")
    parser.add_argument("--keep", default="98,49")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tower(args.model)
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else model.image_size
    images = torch.randn(args.batch, 3, *size)
    dense_flops = flops(model, images)
    seconds(model, images)  # warm-up
    table = Table(title=f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads")
    for column in ("method", "keep", "rows per block", "GFLOPs", "FLOPs vs dense", "time vs dense"):
        table.add_column(column)
    table.add_row("dense", "-", "-", f"{dense_flops / 1e9:.1f}", "1.00", "1.00")
    for method in args.methods.split(","):
        for keep in (float(k) if "." in k else int(k) for k in args.keep.split(",")):
            handle = vtprune.wrap(model, method, keep=keep)
            reduced_flops = flops(model, images)
            lengths = handle.last.seq_lens
            handle.unwrap()
            dense_times, reduced_times = [], []
            for _ in range(args.repeats):
                dense_times.append(seconds(model, images))
                with vtprune.wrap(model, method, keep=keep):
                    reduced_times.append(seconds(model, images))
            ratio = statistics.median(reduced_times) / statistics.median(dense_times)
            table.add_row(method, str(keep), f"{lengths[0]} -> {lengths[-1]}", f"{reduced_flops / 1e9:.1f}",
                          f"{reduced_flops / dense_flops:.2f}", f"{ratio:.2f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
