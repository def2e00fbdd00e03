"""Timing honesty in cost reports: repeat counts, min / median / max of every timing, and the "noisy" flag (a
timing's spread above 20 %, or the dense control's pruned / born-short outside 0.9-1.1). Timings are hand-made
(the timer is replaced), so every flag below is decided by the rule alone, never by this machine's load."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from rich.console import Console

from tests.helpers import Image, make_batch, tiny_model
from vtprune.eval import report as report_module
from vtprune.eval.latency import Measurement, Timing
from vtprune.eval.report import CONTROL_BAND, SPREAD_LIMIT, Report, build_report, noise_reasons

QUIET = [10.0, 10.5, 11.0]  # spread 0.095


def _text(renderable) -> str:
    console = Console(record=True, width=220)
    console.print(renderable)
    return console.export_text()


def test_timing_reports_repeats_and_spread():
    timing = Timing([12.0, 10.0, 11.0, 14.0])
    assert (timing.repeats, timing.low, timing.median, timing.high) == (4, 10.0, 11.5, 14.0)
    assert timing.spread == pytest.approx(4.0 / 11.5)
    assert math.isnan(Timing([5.0]).spread) and Timing([5.0]).repeats == 1  # one run: no spread to judge
    assert math.isnan(Timing().spread) and Timing().repeats == 0


def _dense(ratio: float = 1.0, spread: float = 0.1) -> dict:
    return {"method": "dense", "keep": None, "pruned_vs_born_short": ratio, "prefill_ms": 10.0,
            "prefill_ms_spread": spread}  # fmt: skip


@pytest.mark.parametrize(
    "ratio,noisy",
    [(1.0, False), (0.9, False), (1.1, False), (1.38, True), (1.51, True), (0.80, True), (0.899, True), (1.101, True)],
)
def test_the_dense_control_outside_its_band_flags_the_row_and_the_report(ratio, noisy):
    report = Report([_dense(ratio), {"method": "fastv", "keep": 64, "pruned_vs_born_short": 1.0}])
    assert bool(noise_reasons(report.rows[0])) is noisy and report.noisy is noisy
    assert not noise_reasons(report.rows[1])
    if noisy:
        assert report.noise() == [f"dense: dense pruned / born-short {ratio:.2f} (identical work: should be 0.9-1.1)"]


def test_only_the_dense_row_is_a_control():
    # a pruned row's pruned / born-short measures vtprune's overhead: far from 1 is a finding, not noise
    report = Report([_dense(), {"method": "fastv", "keep": 64, "pruned_vs_born_short": 2.0}])
    assert not report.noisy and report.noise() == []


@pytest.mark.parametrize(
    "spread,noisy", [(0.0, False), (0.2, False), (0.2001, True), (0.5, True), (float("nan"), False), (None, False)]
)
def test_a_timing_spread_above_20_percent_flags_its_row(spread, noisy):
    row = {"method": "fastv", "keep": 64, "vision_ms_spread": 0.05, "end_to_end_ms_spread": spread}
    report = Report([_dense(), row])
    assert bool(noise_reasons(row)) is noisy and report.noisy is noisy
    assert not noise_reasons(report.rows[0])
    if noisy:
        assert report.noise() == [f"fastv@64: end_to_end_ms spread {spread:.0%}"]


def test_the_born_short_timing_is_judged_too():
    assert noise_reasons({"method": "dense", "born_short_llm_ms_spread": 0.3}) == ["born_short_llm_ms spread 30%"]
    assert (SPREAD_LIMIT, CONTROL_BAND) == (0.2, (0.9, 1.1))


# -- build_report with a hand-made timer ---------------------------------------------------------------------------


@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the report's timers: ``plan[method]`` = (samples of every model timing, born-short samples); the
    dense model is measured first, then each (method, keep)."""
    plan: dict[str, tuple[list[float], list[float]]] = {}
    calls: list[str] = []

    def method_now() -> str:
        return calls[-1] if calls else "dense"

    def measure(model, inputs, *, vision_tower, language_model, new_tokens=8, warmup=1, repeats=3, **_):
        with torch.no_grad():
            model(**inputs)  # the forward a wrapped model records what it kept from
        name = plan_order.pop(0)  # build_report measures dense, then the grid in order
        calls.append(name)
        samples, _ = plan[name]
        timings = [Timing(list(samples)) for _ in range(5)]
        return Measurement(*timings, kv_cache_bytes=1024, peak_memory_bytes=None, batch=1, new_tokens=new_tokens,
                           warmup=warmup)  # fmt: skip

    def time_language_model(*args, **kwargs):
        return Timing(list(plan[method_now()][1]))

    plan_order: list[str] = []
    monkeypatch.setattr(report_module, "measure", measure)
    monkeypatch.setattr(report_module, "time_language_model", time_language_model)

    def set_plan(entries: dict[str, tuple[list[float], list[float]]], order: list[str]) -> None:
        plan.update(entries)
        plan_order[:] = order

    return set_plan


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llava")
    return model, make_batch(model, [[5, Image(), 7]])


def _build(tiny, **kwargs) -> Report:
    model, batch = tiny
    return build_report(model, batch, ["fastv"], [16], new_tokens=2, warmup=2, repeats=3, **kwargs)


def test_a_quiet_report_carries_repeats_and_min_median_max_and_no_warning(tiny, fake_timer, tmp_path):
    fake_timer({"dense": (QUIET, QUIET), "fastv": (QUIET, [9.0, 9.5, 10.0])}, ["dense", "fastv"])
    report = _build(tiny)
    dense, fastv = report.rows
    assert dense["pruned_vs_born_short"] == 1.0 and not report.noisy
    for row in (dense, fastv):
        assert (row["repeats"], row["warmup"], row["noisy"], row["noise"]) == (3, 2, False, "")
        assert (row["prefill_ms_min"], row["prefill_ms"], row["prefill_ms_max"]) == (10.0, 10.5, 11.0)
        assert row["prefill_ms_spread"] == pytest.approx(1.0 / 10.5)
    assert (fastv["born_short_llm_ms_min"], fastv["born_short_llm_ms"], fastv["born_short_llm_ms_max"]) == (9, 9.5, 10)
    text = _text(report.table())
    assert "3 timed runs after 2 warm-up" in text and "10.5" in text and "10–11" in text  # median, then min–max
    assert "NOISY" not in text and "noisy" not in text.replace("Noisy", "")
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert data["context"]["noisy"] is False and data["context"]["noise"] == []
    assert (data["context"]["repeats"], data["context"]["warmup"]) == (3, 2)
    assert "20%" in data["context"]["noise_rule"] and "0.9-1.1" in data["context"]["noise_rule"]


def test_the_dense_control_at_1_38_makes_the_report_noisy_everywhere_it_is_read(tiny, fake_timer, tmp_path):
    # the first run: dense pruned / born-short 1.38 with every spread small
    born = [QUIET[1] / 1.38] * 3
    fake_timer({"dense": (QUIET, born), "fastv": (QUIET, QUIET)}, ["dense", "fastv"])
    report = _build(tiny)
    dense, fastv = report.rows
    assert dense["pruned_vs_born_short"] == pytest.approx(1.38)
    assert dense["noisy"] is True and "pruned / born-short 1.38" in dense["noise"]
    assert fastv["noisy"] is False and report.noisy
    text = " ".join(_text(report.table()).split())
    assert "WARNING: timings are NOISY" in text and "--repeats" in text and "--warmup" in text
    assert "quiet machine" in text and "dense: dense pruned / born-short 1.38" in text
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert data["context"]["noisy"] is True and len(data["context"]["noise"]) == 1
    rows = list(csv.DictReader(report.to_csv(tmp_path / "r.csv").open()))
    assert [row["noisy"] for row in rows] == ["True", "False"]
    for name in ("vision_ms", "prefill_ms", "llm_prefill_ms", "decode_ms_per_token", "end_to_end_ms",
                 "born_short_llm_ms"):  # fmt: skip
        assert {f"{name}_min", name, f"{name}_max", f"{name}_spread"} <= set(rows[0]), name
    assert rows[0]["repeats"] == "3" and float(rows[1]["prefill_ms_max"]) == 11.0


def test_a_spread_above_20_percent_flags_only_its_row(tiny, fake_timer):
    fake_timer({"dense": (QUIET, QUIET), "fastv": ([10.0, 11.0, 13.0], QUIET)}, ["dense", "fastv"])
    report = _build(tiny)
    assert [row["noisy"] for row in report.rows] == [False, True] and report.noisy
    assert report.noise()[0].startswith("fastv@16: vision_ms spread 27%")


def test_one_timed_run_says_the_spread_is_unknown(tiny, fake_timer):
    fake_timer({"dense": ([10.0], [10.0]), "fastv": ([8.0], [8.0])}, ["dense", "fastv"])
    report = _build(tiny)
    assert not report.noisy and report.rows[0]["prefill_ms_spread"] is None  # unknown, not NaN (strict JSON)
    text = " ".join(_text(report.table()).split())
    assert "1 timed run after" in text and "spread is unknown" in text


def test_the_plot_shows_min_max_bars_and_a_noisy_title(tmp_path, monkeypatch):
    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    rows = [{**_dense(1.38), "visual_tokens": 64.0, "tflops_prefill": 5e-5, "prefill_ms_min": 9.0,
             "prefill_ms_max": 12.0, "repeats": 3}]  # fmt: skip
    for keep in (32, 16):
        rows.append({"method": "fastv", "keep": keep, "visual_tokens": float(keep), "tflops_prefill": 3e-5,
                     "prefill_ms": 8.0, "prefill_ms_min": 7.0, "prefill_ms_max": 9.5})  # fmt: skip
    Report(rows, {"title": "t"}).plot(tmp_path / "noisy.png")
    axis = saved[-1].axes[1]
    assert axis.get_ylabel() == "prefill ms (median, bars: min-max of 3 runs)"
    bars = [c for c in axis.collections if isinstance(c, LineCollection)]  # errorbar's vertical lines
    spans = {(round(s[0][1], 3), round(s[1][1], 3)) for c in bars for s in c.get_segments() if s[0][0] == s[1][0]}
    assert (7.0, 9.5) in spans and (9.0, 12.0) in spans
    assert "NOISY" in saved[-1].get_suptitle()
    rows[0]["pruned_vs_born_short"] = 1.0
    Report(rows, {"title": "t"}).plot(tmp_path / "quiet.png")
    assert saved[-1].get_suptitle() == "t"
