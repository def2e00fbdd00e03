"""Cost reports: analytical FLOPs and measured latency of a model under several methods and budgets."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vtprune.eval.flops import FlopsReport, model_shape, prefill_flops
from vtprune.eval.latency import measure, time_language_model

# (row key, table header, scale): the terminal table is a digest; JSON and CSV hold every field unscaled
COLUMNS = (
    ("method", "method", None),
    ("keep", "keep", None),
    ("visual_tokens", "visual\ntokens", None),
    ("llm_tokens", "LLM tokens\n/ layer", None),
    ("tflops_prefill", "prefill\nGFLOPs", 1e3),
    ("tflops_llm", "LLM\nGFLOPs", 1e3),
    ("gflops_decode_token", "decode\nGFLOPs/tok", None),
    ("vision_ms", "vision\nms", None),
    ("prefill_ms", "prefill\nms", None),
    ("decode_tokens_per_s", "decode\ntok/s", None),
    ("end_to_end_ms", "end-to-\nend ms", None),
    ("kv_cache_mb", "KV\nMB", None),
    ("peak_memory_mb", "peak\nMB", None),
    ("speedup_vs_predicted", "realized /\npredicted", None),
    ("pruned_vs_born_short", "pruned /\nborn-short", None),
)


@dataclass
class Report:
    """Rows of measurements (the first is the dense model); ``to_dict`` / ``to_csv`` / ``to_json`` / ``plot``."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "rows": self.rows}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=self.context.get("title", "vtprune cost report"))
        for _, header, _ in COLUMNS:
            table.add_column(header, justify="right")
        for row in self.rows:
            cells = []
            for key, _, scale in COLUMNS:
                value = row.get(key)
                cells.append(_format(value * scale if scale is not None and value is not None else value))
            table.add_row(*cells)
        return table

    def plot(self, path: str | Path) -> Path:
        """Prefill FLOPs (GFLOPs or TFLOPs by their size) and prefill latency against visual tokens kept, one line
        per method in its :func:`~vtprune.eval.style.method_style` (dense as a black star)."""
        from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's session

        from vtprune.eval.style import budget_axis, flops_unit, method_styles, plain_numbers

        figure = Figure(figsize=(11, 4), layout="constrained")
        axes = figure.subplots(1, 2)
        dense = next((row for row in self.rows if row["method"] == "dense"), None)
        methods = list(dict.fromkeys(row["method"] for row in self.rows if row["method"] != "dense"))
        styles = method_styles(methods)
        unit, factor = flops_unit(row.get("tflops_prefill") for row in self.rows)
        panels = ((axes[0], "tflops_prefill", f"prefill {unit}", factor), (axes[1], "prefill_ms", "prefill ms", 1.0))
        for axis, key, label, scale in panels:
            for method in methods:
                points = sorted((r["visual_tokens"], r[key] * scale) for r in self.rows if r["method"] == method)
                axis.plot([p[0] for p in points], [p[1] for p in points], **styles[method].line(), label=method)
            if dense is not None:
                axis.scatter([dense["visual_tokens"]], [dense[key] * scale], color="black", marker="*", s=120,
                             label="dense", zorder=3)  # fmt: skip
            axis.set_xlabel("visual tokens kept per image")
            budget_axis(axis, [row["visual_tokens"] for row in self.rows])
            axis.set_ylabel(label)
            plain_numbers(axis.yaxis)
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        figure.suptitle(self.context.get("title", "vtprune cost report"))
        path = Path(path)
        figure.savefig(path, dpi=120)
        return path


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _row(
    method: str, keep: Any, record: Any, flops: FlopsReport, measured: Any, dense: dict[str, Any] | None, born: float
) -> dict[str, Any]:
    final = record.stages[-1].kept_per_item if record.stages else None
    visual = [k.numel() for k in final] if final is not None else [i["num_tokens"] for i in record.items]
    layers = record.tokens_per_layer
    timings = measured.to_dict()
    row = {
        "method": method,
        "keep": keep,
        "budget": record.budget,
        "visual_tokens": sum(visual) / max(len(visual), 1),
        "llm_tokens": sum(sum(counts) / len(counts) for counts in layers) / len(layers),
        "tflops_prefill": flops.prefill / 1e12,
        "tflops_llm": flops.llm / 1e12,
        "tflops_vision": flops.vision / 1e12,
        "gflops_decode_token": flops.decode_per_token / 1e9,
        **timings,
        "kv_cache_mb": measured.kv_cache_bytes / 2**20,
        "peak_memory_mb": measured.peak_memory_bytes / 2**20 if measured.peak_memory_bytes is not None else None,
        "born_short_llm_ms": born,
        "pruned_vs_born_short": timings["llm_prefill_ms"] / born if born > 0 else None,
    }
    if dense is not None:
        predicted = dense["tflops_prefill"] / row["tflops_prefill"]
        realized = dense["prefill_ms"] / row["prefill_ms"]
        row.update(predicted_speedup=predicted, realized_speedup=realized, speedup_vs_predicted=realized / predicted)
    return row


def build_report(
    model: nn.Module,
    inputs: dict[str, Any],
    methods: list[str] | tuple[str, ...] = ("fastv",),
    keep: list[Any] | tuple[Any, ...] = (64,),
    *,
    budget: str = "final",
    new_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    generate_kwargs: dict[str, Any] | None = None,
    tokenizer: Any = None,
    progress: Any = None,
    on_row: Callable[[Report], None] | None = None,
) -> Report:
    """Dense model first, then every (method, keep): FLOPs from what the forward really did, times measured.

    ``progress``: a rich ``Progress`` to advance; ``on_row(report_so_far)`` runs after every row (the CLI writes
    its files there, so an interrupted run keeps what it measured).
    """
    import vtprune

    adapter = vtprune.adapter_for(model)
    shape = model_shape(model)
    parameter = next(model.parameters())
    options = {"pad_token_id": 0, **(generate_kwargs or {})}
    batch = inputs["input_ids"].shape[0]
    timing = dict(new_tokens=new_tokens, warmup=warmup, repeats=repeats, generate_kwargs=options)
    modules = dict(vision_tower=adapter.vision_tower(), language_model=adapter.language_model)

    def born_short(record: Any) -> float:
        return time_language_model(
            adapter.language_model, record.tokens_per_layer[-1], shape.language.hidden,
            device=parameter.device, dtype=parameter.dtype, warmup=warmup, repeats=repeats,
        ).median  # fmt: skip

    def flops_of(record: Any) -> FlopsReport:
        return prefill_flops(model, record, record.encoder_inputs, logits_rows=[1] * batch)  # generate: last row

    with vtprune.wrap(model, "random", keep=1.0) as probe:  # nothing dropped: the dense token counts
        model(**inputs)
        dense_record = probe.last
    dense_measured = measure(model, inputs, **modules, **timing)
    dense = _row("dense", None, dense_record, flops_of(dense_record), dense_measured, None, born_short(dense_record))
    rows = [dense]
    context = {
        "title": f"{type(model).__name__}: cost per {batch}-prompt batch",
        "device": str(parameter.device),
        "dtype": str(parameter.dtype),
        "torch": torch.__version__,
        "flops": "multiply-adds x 2; prefill for generate (LM head on the last row); full n x n attention",
        "budget": budget,
        "timing": f"median of {repeats} after {warmup} warm-up; prefill = one cached forward; decode from generate",
    }
    report = Report(rows, context)
    if on_row is not None:
        on_row(report)
    grid = list(product(methods, keep))
    task = progress.add_task("measuring", total=len(grid)) if progress is not None else None
    for method, budget_value in grid:
        with vtprune.wrap(model, method, keep=budget_value, budget=budget, tokenizer=tokenizer) as pruning:
            measured = measure(model, inputs, **modules, **timing)
            record = pruning.last
        rows.append(_row(method, budget_value, record, flops_of(record), measured, dense, born_short(record)))
        if on_row is not None:
            on_row(report)
        if task is not None:
            progress.advance(task)
    return report
