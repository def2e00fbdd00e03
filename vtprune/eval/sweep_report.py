"""Tables and plots of a sweep's ``results.jsonl``: score against prefill FLOPs (Pareto front per method) and
kept tokens."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from vtprune.core.budget import budget_label
from vtprune.eval.style import budget_axis, flops_unit, method_styles, plain_numbers
from vtprune.eval.sweep import DENSE, read_results, row_setup

SUMMARY_FILE = "summary.csv"
PLOT_FILE = "pareto.png"


def split_setups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The folder's setups (model, tasks, limit, budget, budget unit, options) in the order first written, each with
    a short label naming what sets it apart from the others (a folder may hold several: a rerun with another limit,
    another model, another budget unit) and its rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row_setup(row), sort_keys=True, default=str), []).append(row)
    setups = [row_setup(group[0]) or {} for group in groups.values()]
    keys = list(dict.fromkeys(key for setup in setups for key in setup))
    differing = [key for key in keys if len({json.dumps(s.get(key), sort_keys=True, default=str) for s in setups}) > 1]
    labels = []
    for setup in setups:
        shown = differing or ["model"]
        parts = [f"{key}={_short(key, setup.get(key))}" for key in shown]
        labels.append(", ".join(parts))
    return list(zip(labels, groups.values()))


def _short(key: str, value: Any) -> str:
    if key == "model":
        return Path(str(value)).name or str(value)
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return str(value)


def primary_metric(rows: list[dict[str, Any]], task: str) -> str:
    """The task's first reported metric (lmms-eval keeps the YAML's order)."""
    for row in rows:
        names = list(row["metrics"].get(task, {}))
        if names:
            return names[0]
    raise ValueError(f"no metric recorded for task {task!r}")


def summarize(rows: list[dict[str, Any]], metric: str | None = None) -> list[dict[str, Any]]:
    """One record per (setup, point, task): score, score relative to its setup's dense, TFLOPs, prefill ms, visual
    tokens kept; ``setup`` is the label of :func:`split_setups`."""
    return [
        {"setup": label, **record}
        for label, group in split_setups(rows)
        for record in _summarize_setup(group, metric)
    ]


def _summarize_setup(rows: list[dict[str, Any]], metric: str | None) -> list[dict[str, Any]]:
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
                "visual_tokens": cost.get("visual_tokens"), "sample_visual_tokens": cost.get("sample_visual_tokens"),
                "visual_tokens_per_layer": cost.get("visual_tokens_per_layer"), "documents": cost.get("documents"),
            })  # fmt: skip
    order = {DENSE: -1}
    records.sort(key=lambda r: (tasks.index(r["task"]), order.get(r["method"], 0), r["method"], -_final(r["keep"])))
    return records


def table(records: list[dict[str, Any]], title: str = "vtprune sweep") -> Any:
    from rich.table import Table

    view = Table(title=title)
    several = len({r.get("setup") for r in records}) > 1
    # a sample's kept tokens where they differ from the per-item count (several images, or video frames budgeted
    # one by one): the number that compares budget units
    per_sample = any(
        r.get("sample_visual_tokens") is not None and r["sample_visual_tokens"] != r["visual_tokens"] for r in records
    )  # fmt: skip
    # a sample's visual tokens averaged over the decoder layers, where some method's differ from what it keeps at
    # the end: what in-LLM stages and exits (DyVTE) cost
    per_layer = any(
        r.get("visual_tokens_per_layer") is not None
        and abs(r["visual_tokens_per_layer"] - (r.get("sample_visual_tokens") or r["visual_tokens"] or 0)) > 0.05
        for r in records
    )
    headers = ("task", "method", "keep", "visual tokens", *(("tokens / sample",) if per_sample else ()),
               *(("tokens / layer",) if per_layer else ()), "score", "vs dense", "prefill TFLOPs",
               "prefill ms")  # fmt: skip
    for header in (("setup",) if several else ()) + headers:
        view.add_column(header, justify="left" if header in ("setup", "task", "method") else "right")
    for r in records:
        view.add_row(
            *((r["setup"],) if several else ()),
            r["task"], r["method"], budget_label(r["keep"]),
            _number(r["visual_tokens"], "{:.1f}"),
            *((_number(r.get("sample_visual_tokens"), "{:.1f}"),) if per_sample else ()),
            *((_number(r.get("visual_tokens_per_layer"), "{:.1f}"),) if per_layer else ()),
            f"{r['metric']} {r['score']:.3f}", _number(r["vs_dense"], "{:.1%}"),
            _number(r["tflops"], "{:.3g}"), _number(r["prefill_ms"], "{:.1f}"),
        )  # fmt: skip
    return view


def _final(keep: Any) -> float:
    """The budget a point ends at (per-part budgets: the last part's), for ordering rows."""
    if isinstance(keep, (list, tuple)):
        keep = keep[-1] if keep else None
    return float(keep or 0)


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
    and score vs the visual tokens each sample holds averaged over the LLM's layers (results from before that was
    recorded: the tokens kept per image, or per video). Each method keeps its colour and marker of
    :func:`vtprune.eval.style.method_style` in every plot; FLOPs read in GFLOPs or TFLOPs by their size."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = list(dict.fromkeys((r.get("setup"), r["task"]) for r in records))
    several = len({setup for setup, _ in panels}) > 1
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != DENSE))
    styles = method_styles(methods)
    unit, factor = flops_unit(r["tflops"] for r in records)
    columns = 1 + (len(methods) + 1) // 24  # legend columns beside the panels
    figure = Figure(figsize=(12 + 1.6 * columns, 4.2 * max(1, len(panels))), layout="constrained")
    axes = figure.subplots(max(1, len(panels)), 2, squeeze=False)
    # what the LLM attends to, averaged over its layers, where recorded: the cost of in-LLM stages and exits (DyVTE
    # keeps none at the end, ATP a different count per layer); older results only have the final count per image
    per_layer = all(r.get("visual_tokens_per_layer") is not None for r in records if r["method"] != DENSE)
    tokens_key = "visual_tokens_per_layer" if per_layer else "visual_tokens"
    for row, (setup, task) in zip(axes, panels):
        mine = [r for r in records if r["task"] == task and r.get("setup") == setup]
        dense = next((r for r in mine if r["method"] == DENSE), None)
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != DENSE):
            style = styles[method]
            points = [r for r in mine if r["method"] == method and r["tflops"] is not None]
            costs = [p["tflops"] * factor for p in points]
            row[0].scatter(costs, [p["score"] for p in points], **style.points(), alpha=0.35, s=26, linewidths=0)
            front = pareto_front([(c, p["score"]) for c, p in zip(costs, points)])
            row[0].plot([c for c, _ in front], [s for _, s in front], **style.line(), markersize=6, label=method)
            by_tokens = sorted((p[tokens_key], p["score"]) for p in points if p[tokens_key] is not None)
            row[1].plot([t for t, _ in by_tokens], [s for _, s in by_tokens], **style.line(), markersize=6)
        if dense is not None:
            if dense["tflops"] is not None:
                row[0].scatter([dense["tflops"] * factor], [dense["score"]], color="black", marker="*", s=160, zorder=3)
            row[1].axhline(dense["score"], color="black", linestyle="--", linewidth=1)
        metric = mine[0]["metric"] if mine else ""
        row[0].set_xlabel(f"prefill {unit} per sample")
        plain_numbers(row[0].xaxis)
        row[1].set_xlabel("visual tokens per sample, mean over the LLM's layers" if per_layer
                          else "visual tokens kept per image (or video)")  # fmt: skip
        budget_axis(row[1], [r[tokens_key] for r in mine if r["method"] != DENSE])
        for axis in row:
            axis.set_ylabel(f"{task}: {metric}")
            axis.grid(alpha=0.3)
        if several:  # which setup this row of panels shows
            row[0].set_title(setup, loc="left", fontsize=9)
    handles = [Line2D([], [], **styles[m].line(), label=m) for m in methods]
    if any(r["method"] == DENSE for r in records):
        handles.append(Line2D([], [], color="black", marker="*", markersize=11, linestyle="--", label="dense"))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, ncols=columns, title="method",
                  title_fontsize=8)  # fmt: skip
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_reports(
    out_dir: str | Path, metric: str | None = None, setup: int | None = None
) -> tuple[list[dict[str, Any]], Path, Path]:
    """Summarise ``out_dir/results.jsonl`` into ``summary.csv`` and ``pareto.png``; returns (records, csv, png).

    Every setup in the folder is summarised (a ``setup`` column, a row of panels each) unless ``setup`` picks one
    by its number (1 = the first written, as :func:`split_setups` orders them).
    """
    rows = read_results(out_dir)
    if not rows:
        raise ValueError(f"{Path(out_dir) / 'results.jsonl'} holds no results yet")
    setups = split_setups(rows)
    if setup is not None:
        if not 1 <= setup <= len(setups):
            listed = "; ".join(f"{i}: {label}" for i, (label, _) in enumerate(setups, start=1))
            raise ValueError(f"setup must be one of 1..{len(setups)} ({listed}), got {setup}")
        setups = [setups[setup - 1]]
    records = summarize([row for _, group in setups for row in group], metric)
    first = setups[0][1][0].get("setup") or {}
    if len(setups) == 1:
        title = f"{Path(str(first.get('model'))).name}: {', '.join(first.get('tasks', []))} (limit {first.get('limit')})"
    else:
        title = f"{len(setups)} setups in {Path(out_dir).name}"
    return records, write_csv(records, Path(out_dir) / SUMMARY_FILE), plot(records, Path(out_dir) / PLOT_FILE, title)
