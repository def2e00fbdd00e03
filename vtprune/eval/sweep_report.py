"""Tables and plots of a sweep's ``results.jsonl``: score against prefill FLOPs (Pareto front per method) and
kept tokens."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from vtprune.eval.style import budget_axis, flops_unit, method_styles, plain_numbers
from vtprune.eval.sweep import DENSE, read_results

SUMMARY_FILE = "summary.csv"
PLOT_FILE = "pareto.png"


def latest_setup_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the setup (model, tasks, limit, budget, options) written last: a folder may hold several."""
    if not rows:
        return []
    latest = json.dumps(rows[-1].get("setup"), sort_keys=True)
    return [row for row in rows if json.dumps(row.get("setup"), sort_keys=True) == latest]


def primary_metric(rows: list[dict[str, Any]], task: str) -> str:
    """The task's first reported metric (lmms-eval keeps the YAML's order)."""
    for row in rows:
        names = list(row["metrics"].get(task, {}))
        if names:
            return names[0]
    raise ValueError(f"no metric recorded for task {task!r}")


def summarize(rows: list[dict[str, Any]], metric: str | None = None) -> list[dict[str, Any]]:
    """One record per (point, task): score, score relative to dense, TFLOPs, prefill ms, visual tokens kept."""
    rows = latest_setup_rows(rows)
    tasks = list(dict.fromkeys(task for row in rows for task in row["metrics"]))
    dense = next((row for row in rows if row["method"] == DENSE), None)
    records = []
    for task in tasks:
        name = metric or primary_metric(rows, task)
        reference = dense["metrics"].get(task, {}).get(name) if dense else None
        for row in rows:
            if name not in row["metrics"].get(task, {}):
                raise ValueError(f"metric {name!r} is not reported for {task}; it has {', '.join(row['metrics'][task])}")
            score = row["metrics"][task][name]
            cost = row.get("cost", {}).get("tasks", {}).get(task) or row.get("cost", {})
            records.append({
                "task": task, "metric": name, "method": row["method"], "keep": row.get("keep"),
                "score": score, "vs_dense": score / reference if reference else None,
                "tflops": cost.get("tflops_prefill"), "prefill_ms": cost.get("prefill_ms"),
                "visual_tokens": cost.get("visual_tokens"), "samples": cost.get("samples"),
            })  # fmt: skip
    order = {DENSE: -1}
    records.sort(key=lambda r: (tasks.index(r["task"]), order.get(r["method"], 0), r["method"], -(r["keep"] or 0)))
    return records


def table(records: list[dict[str, Any]], title: str = "vtprune sweep") -> Any:
    from rich.table import Table

    view = Table(title=title)
    for header in ("task", "method", "keep", "visual tokens", "score", "vs dense", "prefill TFLOPs", "prefill ms"):
        view.add_column(header, justify="left" if header in ("task", "method") else "right")
    for r in records:
        view.add_row(
            r["task"], r["method"], "-" if r["keep"] is None else str(r["keep"]),
            _number(r["visual_tokens"], "{:.1f}"), f"{r['metric']} {r['score']:.3f}", _number(r["vs_dense"], "{:.1%}"),
            _number(r["tflops"], "{:.3g}"), _number(r["prefill_ms"], "{:.1f}"),
        )  # fmt: skip
    return view


def _number(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["task"])
        writer.writeheader()
        writer.writerows(records)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and score (higher), by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or score > front[-1][1]:
            front.append((cost, score))
    return front


def plot(records: list[dict[str, Any]], path: str | Path, title: str = "vtprune sweep") -> Path:
    """Per task: score vs prefill FLOPs (each method's points, its Pareto front drawn as a line, dense as a star)
    and score vs visual tokens kept per image. Each method keeps its colour and marker of
    :func:`vtprune.eval.style.method_style` in every plot; FLOPs read in GFLOPs or TFLOPs by their size."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    tasks = list(dict.fromkeys(r["task"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != DENSE))
    styles = method_styles(methods)
    unit, factor = flops_unit(r["tflops"] for r in records)
    columns = 1 + (len(methods) + 1) // 24  # legend columns beside the panels
    figure = Figure(figsize=(12 + 1.6 * columns, 4.2 * max(1, len(tasks))), layout="constrained")
    axes = figure.subplots(max(1, len(tasks)), 2, squeeze=False)
    for row, task in zip(axes, tasks):
        mine = [r for r in records if r["task"] == task]
        dense = next((r for r in mine if r["method"] == DENSE), None)
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != DENSE):
            style = styles[method]
            points = [r for r in mine if r["method"] == method and r["tflops"] is not None]
            costs = [p["tflops"] * factor for p in points]
            row[0].scatter(costs, [p["score"] for p in points], **style.points(), alpha=0.35, s=26, linewidths=0)
            front = pareto_front([(c, p["score"]) for c, p in zip(costs, points)])
            row[0].plot([c for c, _ in front], [s for _, s in front], **style.line(), markersize=6, label=method)
            by_tokens = sorted((p["visual_tokens"], p["score"]) for p in points if p["visual_tokens"] is not None)
            row[1].plot([t for t, _ in by_tokens], [s for _, s in by_tokens], **style.line(), markersize=6)
        if dense is not None:
            if dense["tflops"] is not None:
                row[0].scatter([dense["tflops"] * factor], [dense["score"]], color="black", marker="*", s=160, zorder=3)
            row[1].axhline(dense["score"], color="black", linestyle="--", linewidth=1)
        metric = mine[0]["metric"] if mine else ""
        row[0].set_xlabel(f"prefill {unit} per sample")
        plain_numbers(row[0].xaxis)
        row[1].set_xlabel("visual tokens kept per image")
        budget_axis(row[1], [r["visual_tokens"] for r in mine if r["method"] != DENSE])
        for axis in row:
            axis.set_ylabel(f"{task}: {metric}")
            axis.grid(alpha=0.3)
    handles = [Line2D([], [], **styles[m].line(), label=m) for m in methods]
    if any(r["method"] == DENSE for r in records):
        handles.append(Line2D([], [], color="black", marker="*", markersize=11, linestyle="--", label="dense"))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, ncols=columns, title="method",
                  title_fontsize=8)  # fmt: skip
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_reports(out_dir: str | Path, metric: str | None = None) -> tuple[list[dict[str, Any]], Path, Path]:
    """Summarise ``out_dir/results.jsonl`` into ``summary.csv`` and ``pareto.png``; returns (records, csv, png)."""
    rows = read_results(out_dir)
    if not rows:
        raise ValueError(f"{Path(out_dir) / 'results.jsonl'} holds no results yet")
    records = summarize(rows, metric)
    setup = latest_setup_rows(rows)[0]["setup"]
    title = f"{Path(str(setup['model'])).name}: {', '.join(setup['tasks'])} (limit {setup['limit']})"
    return records, write_csv(records, Path(out_dir) / SUMMARY_FILE), plot(records, Path(out_dir) / PLOT_FILE, title)
