"""Cost reports: analytical FLOPs and measured latency of a model under several methods and budgets.

Every timing is the median of ``repeats`` runs with its min and max beside it, and a row is flagged "noisy" when the
runs disagree: a timing's spread ``(max - min) / median`` above :data:`SPREAD_LIMIT`, or (dense row only) the
control ``pruned / born-short`` outside :data:`CONTROL_BAND`. The dense control times identical work twice (the
language model inside the dense forward, then alone on the same lengths), so anything far from 1.00 is the machine,
not the method: on a busy CPU it came out 1.38, 1.51 and 0.80 in three runs.
"""

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
from vtprune.eval.latency import TIMINGS, Timing, measure, time_language_model, timing_fields

SPREAD_LIMIT = 0.2  # (max - min) / median of one timing's repeated runs above this: the row is noisy
CONTROL_BAND = (0.9, 1.1)  # the dense row's pruned / born-short (identical work) outside this: the report is noisy
# the measured timings a row carries (each with _min, _max, _spread): the model's, then the born-short control's
ROW_TIMINGS = (*TIMINGS, "born_short_llm_ms")
# table cells that show min-max under the median; decode tok/s takes its range from decode ms per token
RANGED = {"vision_ms", "prefill_ms", "end_to_end_ms", "decode_tokens_per_s"}
ADVICE = (
    f"Noisy = a timing's repeated runs spread more than {SPREAD_LIMIT:.0%} ((max - min) / median), or the dense "
    f"control pruned / born-short (identical work, ideally 1.00) lies outside {CONTROL_BAND[0]:g}-"
    f"{CONTROL_BAND[1]:g}: differences between rows smaller than that are the machine, not the method. Rerun with "
    "more --repeats (e.g. 10) and --warmup (e.g. 3) on a quiet machine (no other jobs; on a GPU, nothing else on it)."
)

# (row key, table header, scale): the terminal table is a digest; JSON and CSV hold every field unscaled
COLUMNS = (
    ("method", "method", None),
    ("keep", "keep", None),
    ("visual_tokens", "visual\ntokens", None),
    ("video_tokens_per_frame", "video tok\n/ frame", None),
    ("tflops_per_frame", "GFLOPs\n/ frame", 1e3),
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
    ("noisy", "timing", None),
)
VIDEO_COLUMNS = ("video_tokens_per_frame", "tflops_per_frame")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def noise_reasons(row: dict[str, Any]) -> list[str]:
    """Why ``row``'s timings cannot be trusted (empty when they can): every timing whose spread exceeds
    :data:`SPREAD_LIMIT`, and for the dense row a ``pruned / born-short`` control outside :data:`CONTROL_BAND`.
    Reads only the row's fields, so rows loaded back from report.json are judged the same way."""
    reasons = []
    for name in ROW_TIMINGS:
        spread = row.get(f"{name}_spread")
        if _finite(spread) and spread > SPREAD_LIMIT:
            reasons.append(f"{name} spread {spread:.0%}")
    ratio = row.get("pruned_vs_born_short")
    if row.get("method") == "dense" and _finite(ratio) and not CONTROL_BAND[0] <= ratio <= CONTROL_BAND[1]:
        low, high = CONTROL_BAND
        reasons.append(f"dense pruned / born-short {ratio:.2f} (identical work: should be {low:g}-{high:g})")
    return reasons


def _label(row: dict[str, Any]) -> str:
    return row["method"] if row.get("keep") is None else f"{row['method']}@{row['keep']}"


@dataclass
class Report:
    """Rows of measurements (the first is the dense model); ``to_dict`` / ``to_csv`` / ``to_json`` / ``plot``."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def noisy(self) -> bool:
        """Whether any row's timings are noisy (see :func:`noise_reasons`): then no row's timing should be trusted
        to the last tens of per cent."""
        return any(noise_reasons(row) for row in self.rows)

    def noise(self) -> list[str]:
        """One line per noisy row: ``"fastv@64: prefill_ms spread 35%, vision_ms spread 22%"``."""
        return [f"{_label(row)}: {', '.join(reasons)}" for row in self.rows if (reasons := noise_reasons(row))]

    def repeats(self) -> tuple[int | None, int | None]:
        """(timed runs, warm-up runs) per row: the fewest any row really has, else what the context asked for
        (None where neither says)."""
        counts = [row["repeats"] for row in self.rows if row.get("repeats") is not None]
        warmups = [row["warmup"] for row in self.rows if row.get("warmup") is not None]
        repeats = min(counts) if counts else self.context.get("repeats")
        return repeats, min(warmups) if warmups else self.context.get("warmup")

    def to_dict(self) -> dict[str, Any]:
        """``{"context": ..., "rows": ...}``; the context says whether the report is noisy, why, and by which rule."""
        rule = (f"noisy: a timing's (max - min) / median > {SPREAD_LIMIT:.0%}, or the dense row's pruned / "
                f"born-short outside {CONTROL_BAND[0]:g}-{CONTROL_BAND[1]:g}")  # fmt: skip
        context = {**self.context, "noisy": self.noisy, "noise": self.noise(), "noise_rule": rule}
        return {"context": context, "rows": self.rows}

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
        """A rich ``Table``: each timing as its median with min-max under it, a "timing" column saying ok / noisy,
        and a caption with the repeat counts and, when noisy, a warning saying why and what to do."""
        from rich.table import Table
        from rich.text import Text

        repeats, warmup = self.repeats()
        runs = f"{repeats} timed run{'s' if repeats != 1 else ''}" if repeats is not None else "the timed runs"
        caption = Text(f"ms and tok/s: median, under it min–max of {runs}"
                       + (f" after {warmup} warm-up" if warmup is not None else "")
                       + "; report.json / report.csv hold every timing's min, median, max and spread")  # fmt: skip
        if repeats is not None and repeats < 2:
            caption.append("\nOne timed run: the spread is unknown, so noise cannot be told from speed; use "
                           "--repeats 3 or more.", style="yellow")  # fmt: skip
        if self.noisy:
            caption.append("\nWARNING: timings are NOISY. ", style="bold red")
            caption.append(ADVICE, style="red")
            for line in self.noise():
                caption.append(f"\n  {line}", style="red")
        table = Table(title=self.context.get("title", "vtprune cost report"), caption=caption,
                      caption_justify="left")  # fmt: skip
        # the per-frame columns only where a row has videos
        columns = [c for c in COLUMNS if c[0] not in VIDEO_COLUMNS or any(c[0] in row for row in self.rows)]
        for _, header, _ in columns:
            table.add_column(header, justify="right")
        for row in self.rows:
            cells: list[Any] = []
            for key, _, scale in columns:
                value = row.get(key)
                text = _format(value * scale if scale is not None and value is not None else value)
                if key == "noisy":
                    text = "noisy" if noise_reasons(row) else "ok"
                    cells.append(Text(text, style="bold red" if text == "noisy" else "green"))
                    continue
                span = _range(row, key) if key in RANGED else None
                cells.append(text if span is None else Text(text).append(f"\n{span}", style="dim"))
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
        repeats, _ = self.repeats()
        runs = f"{repeats} runs" if repeats is not None else "runs"
        panels = ((axes[0], "tflops_prefill", f"prefill {unit}", factor),
                  (axes[1], "prefill_ms", f"prefill ms (median, bars: min-max of {runs})", 1.0))  # fmt: skip
        for axis, key, label, scale in panels:
            for method in methods:
                points = sorted((r["visual_tokens"], r[key] * scale) for r in self.rows if r["method"] == method)
                axis.plot([p[0] for p in points], [p[1] for p in points], **styles[method].line(), label=method)
                if key == "prefill_ms":
                    _error_bars(axis, [r for r in self.rows if r["method"] == method], key, styles[method].colour)
            if dense is not None:
                axis.scatter([dense["visual_tokens"]], [dense[key] * scale], color="black", marker="*", s=120,
                             label="dense", zorder=3)  # fmt: skip
                if key == "prefill_ms":
                    _error_bars(axis, [dense], key, "black")
            axis.set_xlabel("visual tokens kept per image (or video)")
            budget_axis(axis, [row["visual_tokens"] for row in self.rows])
            axis.set_ylabel(label)
            plain_numbers(axis.yaxis)
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        title = self.context.get("title", "vtprune cost report")
        if self.noisy:  # the picture travels without the table: it carries the warning itself
            figure.suptitle(f"{title}\nNOISY timings (repeated runs disagree; see report.json): rerun with more "
                            "--repeats / --warmup on a quiet machine", color="#b00000")  # fmt: skip
        else:
            figure.suptitle(title)
        path = Path(path)
        figure.savefig(path, dpi=120)
        return path


def _error_bars(axis: Any, rows: list[dict[str, Any]], key: str, colour: str) -> None:
    """Min-max bars of ``key`` at each row's visual tokens (rows without a measured range draw none)."""
    ranged = [r for r in rows if _finite(r.get(f"{key}_min")) and _finite(r.get(f"{key}_max"))]
    if ranged:
        x = [r["visual_tokens"] for r in ranged]
        y = [r[key] for r in ranged]
        below = [max(r[key] - r[f"{key}_min"], 0.0) for r in ranged]
        above = [max(r[f"{key}_max"] - r[key], 0.0) for r in ranged]
        axis.errorbar(x, y, yerr=[below, above], fmt="none", ecolor=colour, capsize=3, linewidth=1)


def _range(row: dict[str, Any], key: str) -> str | None:
    """``"min-max"`` of a timing cell (decode tok/s from decode ms per token: the slowest token gives the lowest
    rate), or None when the row has no range (one timed run has none worth printing)."""
    if row.get("repeats") is not None and row["repeats"] < 2:
        return None
    if key == "decode_tokens_per_s":
        slow, fast, batch = row.get("decode_ms_per_token_max"), row.get("decode_ms_per_token_min"), row.get("batch")
        if not (_finite(slow) and _finite(fast) and _finite(batch)) or fast <= 0:
            return None
        low, high = batch * 1e3 / slow, batch * 1e3 / fast
    else:
        low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
        if not (_finite(low) and _finite(high)):
            return None
    return f"{_format(float(low))}–{_format(float(high))}"  # an en dash: a minus sign would read as a sign


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _row(
    method: str, keep: Any, record: Any, flops: FlopsReport, measured: Any, dense: dict[str, Any] | None, born: Timing
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
        **timing_fields("born_short_llm_ms", born),
        "pruned_vs_born_short": timings["llm_prefill_ms"] / born.median if born.median > 0 else None,
    }
    if dense is not None:
        predicted = dense["tflops_prefill"] / row["tflops_prefill"]
        realized = dense["prefill_ms"] / row["prefill_ms"]
        row.update(predicted_speedup=predicted, realized_speedup=realized, speedup_vs_predicted=realized / predicted)
    row.update(video_fields(record.items, visual, flops.prefill))
    reasons = noise_reasons(row)
    row.update(noisy=bool(reasons), noise=", ".join(reasons))
    return row


def video_fields(items: list[dict[str, Any]], kept: list[int], prefill_flops: float) -> dict[str, Any]:
    """What a row says about the batch's videos (nothing when it has none): frames, video tokens per frame before
    and after pruning, and the prefill TFLOPs per frame (the whole prefill, text and images included, over the
    video frames). A video budgeted as a whole is one item listing its frames; with ``budget_unit="frame"`` every
    frame is an item of its own."""
    videos = [(item, count) for item, count in zip(items, kept) if item.get("modality") == "video"]
    if not videos:
        return {}
    frames = sum(len(item.get("frames") or (item["num_tokens"],)) for item, _ in videos)
    return {
        "video_frames": frames,
        "video_tokens_per_frame_before": sum(item["num_tokens"] for item, _ in videos) / frames,
        "video_tokens_per_frame": sum(count for _, count in videos) / frames,
        "tflops_per_frame": prefill_flops / 1e12 / frames,
    }


def build_report(
    model: nn.Module,
    inputs: dict[str, Any],
    methods: list[str] | tuple[str, ...] = ("fastv",),
    keep: list[Any] | tuple[Any, ...] = (64,),
    *,
    budget: str = "final",
    budget_unit: str = "video",
    new_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    generate_kwargs: dict[str, Any] | None = None,
    tokenizer: Any = None,
    progress: Any = None,
    on_row: Callable[[Report], None] | None = None,
) -> Report:
    """Dense model first, then every (method, keep): FLOPs from what the forward really did, times measured.

    ``budget_unit``: what ``keep`` counts on a video (see ``vtprune.wrap``). ``progress``: a rich ``Progress`` to
    advance; ``on_row(report_so_far)`` runs after every row (the CLI writes
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

    def born_short(record: Any) -> Timing:
        return time_language_model(
            adapter.language_model, record.tokens_per_layer[-1], shape.language.hidden,
            device=parameter.device, dtype=parameter.dtype, warmup=warmup, repeats=repeats,
        )  # fmt: skip

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
        "budget_unit": budget_unit,
        "timing": f"median (min, max) of {repeats} after {warmup} warm-up; prefill = one cached forward; decode "
                  "from generate",
        "repeats": repeats,
        "warmup": warmup,
    }
    report = Report(rows, context)
    if on_row is not None:
        on_row(report)
    grid = list(product(methods, keep))
    task = progress.add_task("measuring", total=len(grid)) if progress is not None else None
    for method, budget_value in grid:
        with vtprune.wrap(
            model, method, keep=budget_value, budget=budget, budget_unit=budget_unit, tokenizer=tokenizer
        ) as pruning:
            measured = measure(model, inputs, **modules, **timing)
            record = pruning.last
        rows.append(_row(method, budget_value, record, flops_of(record), measured, dense, born_short(record)))
        if on_row is not None:
            on_row(report)
        if task is not None:
            progress.advance(task)
    return report
