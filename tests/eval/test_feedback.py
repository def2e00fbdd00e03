"""What users see while commands run: quiet library logs, default budgets that fit the model, per-part budgets of
composed methods in sweeps, and a resume line on Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.core.budget import budget_label, parse_budget
from vtprune.eval.sweep import SweepSpec, append_result, default_keeps, read_results, saved_points

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_budgets_parse_per_part_and_name_the_bad_value():
    assert parse_budget("64") == 64 and parse_budget("0.25") == 0.25 and parse_budget("128/64") == (128, 64)
    assert budget_label((128, 64)) == "128/64" and budget_label(0.25) == "0.25" and budget_label(None) == "-"
    with pytest.raises(ValueError, match=r"per-part budgets such as 128/64; got '128/x'"):
        parse_budget("128/x")
    with pytest.raises(ValueError, match=r"keep as a fraction must lie in \(0, 1\]"):
        parse_budget("128/1.5")


def test_default_budgets_follow_the_models_tokens_per_image():
    assert default_keeps("embedded") == [32, 16, 8, 4]  # the digits LLaVA's 64 tokens
    assert default_keeps("shaped:llava") == [288, 144, 72, 36]  # LLaVA-1.5's 576
    assert default_keeps("tiny:qwen2_vl") == [0.5, 0.25, 0.125, 0.0625]  # depends on the image: fractions


def test_sweep_without_keep_says_which_budgets_it_chose(tmp_path, monkeypatch):
    seen = {}

    def fake_run(spec, **_):
        seen["keeps"] = spec.keeps
        append_result(spec.out_dir, {"setup": spec.setup(), "method": "dense", "keep": None,
                                     "metrics": {"vtprune_digits": {"accuracy": 1.0}}, "cost": {}})  # fmt: skip

    monkeypatch.setattr("vtprune.eval.sweep.run_sweep", fake_run)
    result = runner.invoke(app, ["sweep", "--model", "tiny:llava", "--methods", "random", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["keeps"] == [32, 16, 8, 4]
    assert "budgets for tiny:llava of its 64 tokens per image: 32, 16, 8, 4" in _text(result.output)


def test_ctrl_c_in_a_sweep_says_how_many_points_are_saved_and_how_to_resume(tmp_path, monkeypatch):
    def interrupted(spec, on_start=None, on_row=None, **_):
        on_start(5, 5)
        for method, keep in (("dense", None), ("random", 8)):
            row = {"setup": spec.setup(), "method": method, "keep": keep, "metrics": {"t": {"a": 1.0}},
                   "cost": {}, "seconds": 1.0}  # fmt: skip
            append_result(spec.out_dir, row)
            on_row(row)
        raise KeyboardInterrupt

    monkeypatch.setattr("vtprune.eval.sweep.run_sweep", interrupted)
    result = runner.invoke(app, ["sweep", "--model", "tiny:llava", "--methods", "random", "--keep", "8,4",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 130
    assert f"Interrupted. 2 points saved in {tmp_path}; rerun the same command to resume." in _text(result.output)


def test_ctrl_c_in_a_report_says_where_the_measured_rows_are(tmp_path, monkeypatch):
    from vtprune.eval.report import Report

    def interrupted(*_, on_row=None, **__):
        on_row(Report([{"method": "dense", "keep": None}], {}))
        raise KeyboardInterrupt

    monkeypatch.setattr("vtprune.eval.report.build_report", interrupted)
    result = runner.invoke(app, ["report", "--model", "tiny:llava", "--methods", "random", "--keep", "8",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 130
    assert f"1 rows measured so far are in {tmp_path / 'report.json'}" in _text(result.output)
    assert (tmp_path / "report.json").is_file()


def test_a_composed_sweep_takes_per_part_budgets_quietly_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "vtprune.cli", "sweep", "--model", "tiny:llava", "--methods",
               "divprune+random", "--option", "random.layer=2", "--keep", "32/16,16", "--tasks", "vtprune_digits_yesno",
               "--limit", "2",
               "--out", str(out)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = read_results(out)
    assert sorted(str(row["keep"]) for row in rows) == ["16", "None", "[32, 16]"]
    composed = next(row for row in rows if row["keep"] == [32, 16])
    assert composed["cost"]["config"]["keeps"] == [32, 16] and composed["cost"]["visual_tokens"] == 16
    assert "divprune+random 32/16" in _text(first.stdout)
    # lmms-eval's DEBUG lines and the tqdm bars of transformers / lmms-eval stay hidden without --verbose
    both = first.stdout + first.stderr
    assert "DEBUG" not in both and "Loading weights" not in both and "it/s]" not in both, both
    spec = SweepSpec(model="tiny:llava", methods=["divprune+random"], keeps=[(32, 16), 16], options={"random.layer": 2},
                     tasks=["vtprune_digits_yesno"], out_dir=str(out), limit=2)  # fmt: skip
    assert saved_points(spec) == 3
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert "3 of 3 points already in" in _text(again.stdout) and len(read_results(out)) == 3
