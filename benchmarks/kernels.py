"""Triton vs torch reference for vtprune's data-movement ops on LLaVA-sized shapes, with achieved bandwidth.

For each op and shape: median time of the torch reference and of the Triton kernel (side by side in one run),
their ratio, and the bandwidth each achieves (bytes the op must read and write / time) against the device's
practical peak, measured here as a large device-to-device copy (and the nominal peak where the GPU is known).
On a machine without CUDA only the torch path runs, against the CPU's copy bandwidth.

    python benchmarks/kernels.py [--repeats 50] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from vtprune.kernels import compact_kv, gather_tokens, merge_tokens
from vtprune.kernels._triton import triton_available

NOMINAL_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0, "4090": 1008.0}


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of a 512 MiB device-to-device copy: the practical peak the ops are judged against."""
    source = torch.empty(256 * 2**20, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    seconds = measure(lambda: target.copy_(source), max(3, repeats // 5), device)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def cases(dtype: torch.dtype, device: torch.device):
    """(op, shape text, bytes moved, torch call, triton call) on LLaVA-sized shapes."""
    size = torch.finfo(dtype).bits // 8
    hidden = 4096
    for rows in (576, 2880):
        for kept in (64, 192, 576):
            if kept > rows:
                continue
            x = torch.randn(1, rows + 40, hidden, dtype=dtype, device=device)
            index = (torch.randperm(rows, device=device)[:kept].sort().values + 35)[None]
            moved = 2 * kept * hidden * size + kept * 8
            yield (
                "gather_tokens",
                f"N={rows} K={kept} D={hidden}",
                moved,
                lambda x=x, i=index: gather_tokens(x, i, backend="torch", check=False),
                lambda x=x, i=index: gather_tokens(x, i, backend="triton", check=False),
            )
            cache = torch.randn(1, 32, rows + 40, 128, dtype=dtype, device=device)
            moved = 2 * 32 * kept * 128 * size + kept * 8
            yield (
                "compact_kv",
                f"N={rows} K={kept} H=32 d=128",
                moved,
                lambda c=cache, i=index: compact_kv(c, i, backend="torch", check=False),
                lambda c=cache, i=index: compact_kv(c, i, backend="triton", check=False),
            )
            tokens = torch.randn(1, rows, hidden, dtype=dtype, device=device)
            dst = torch.randint(0, kept, (1, rows), device=device)
            weight = torch.rand(1, rows, device=device)
            moved = rows * hidden * size + kept * hidden * size + rows * 12
            yield (
                "merge_tokens",
                f"N={rows} -> K={kept} D={hidden}",
                moved,
                lambda t=tokens, d=dst, w=weight, k=kept: merge_tokens(t, d, w, k, backend="torch", check=False),
                lambda t=tokens, d=dst, w=weight, k=kept: merge_tokens(t, d, w, k, backend="triton", check=False),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with_triton = device.type == "cuda" and triton_available()
    console = Console()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = copy_bandwidth(device, args.repeats)
    nominal = next((v for k, v in NOMINAL_PEAK_GBPS.items() if k in name), None)
    console.print(
        f"device: {name}; copy bandwidth {peak:.0f} GB/s"
        + (f" (nominal {nominal:.0f} GB/s)" if nominal else "")
        + f"; dtype {args.dtype}; torch {torch.__version__}"
        + ("" if with_triton else "; no CUDA: torch path only")
    )
    table = Table(title="vtprune kernels: median time and achieved bandwidth (bytes the op must move / time)")
    columns = ["op", "shape", "torch us", "torch GB/s"]
    if with_triton:
        columns += ["triton us", "triton GB/s", "% of copy peak", "torch / triton"]
    for column in columns:
        table.add_column(column, justify="right")
    for op, shape, moved, torch_call, triton_call in cases(dtype, device):
        reference = measure(torch_call, args.repeats, device)
        row = [op, shape, f"{reference * 1e6:.1f}", f"{moved / reference / 1e9:.0f}"]
        if with_triton:
            kernel = measure(triton_call, args.repeats, device)
            bandwidth = moved / kernel / 1e9
            row += [f"{kernel * 1e6:.1f}", f"{bandwidth:.0f}", f"{bandwidth / peak:.0%}", f"{reference / kernel:.2f}x"]
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
