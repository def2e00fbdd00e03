"""Feedback from ``vtprune dtop``'s evaluation (issue 23: the defaults ran > 10 minutes without a line): a progress
task over thresholds x images, one printed line per finished threshold, and a line saying which rows were reused."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.eval import segmentation
from vtprune.eval.segmentation import evaluate_thresholds

pytest.importorskip("timm")

THRESHOLDS = [1.0, 0.98, 0.9]
LINE = re.compile(r"^thresh (\S+): mIoU (\d\.\d{4}), (\d+\.\d{4}) GFLOPs/image, \d+\.\d% token-blocks run, \d+\.\d s$")


@pytest.fixture(scope="module")
def scenes():
    """The shipped segmenter on 4 held-out digit scenes (64 x 64): a second or two per threshold."""
    from vtprune.data.digit_scenes import scenes as make_scenes
    from vtprune.embedded.segmenter import load_segmenter, to_tensor

    pixels, labels = make_scenes("test", 0, 4, seed=1000)
    return load_segmenter(), to_tensor(pixels), torch.from_numpy(labels)


def _console() -> Console:
    return Console(record=True, file=io.StringIO(), width=200)


def _lines(console: Console) -> list[str]:
    return [line.rstrip() for line in console.export_text().splitlines() if line.strip()]


def test_one_line_per_threshold_with_miou_gflops_and_seconds(scenes):
    model, images, labels = scenes
    console = _console()
    rows = evaluate_thresholds(model, images, labels, THRESHOLDS, batch=3, flop_images=2, console=console)
    lines = _lines(console)
    assert len(lines) == len(THRESHOLDS), lines
    for line, row in zip(lines, rows, strict=True):
        match = LINE.match(line)
        assert match, line
        assert (float(match[1]), float(match[2]), float(match[3])) == (
            row["thresh"], round(row["miou"], 4), round(row["gflops"], 4),
        )  # fmt: skip


def test_progress_counts_every_image_scored_and_flop_counted(scenes):
    model, images, labels = scenes
    console = _console()
    with Progress(console=console) as progress:
        evaluate_thresholds(model, images, labels, THRESHOLDS, batch=3, flop_images=2, progress=progress)
        (task,) = progress.tasks
        # 3 thresholds x (4 scored in batches of 3 + 2 counted one by one)
        assert task.total == task.completed == len(THRESHOLDS) * (4 + 2)
        assert task.description.startswith("DToP thresh 0.9")
    assert sum(bool(LINE.match(line)) for line in _lines(console)) == len(THRESHOLDS)  # lines via the bar's console


def test_a_rerun_says_which_rows_it_reused_and_only_computes_the_rest(scenes, tmp_path, monkeypatch):
    model, images, labels = scenes
    out = tmp_path / "dtop" / "results.jsonl"
    first = evaluate_thresholds(model, images, labels, THRESHOLDS[:2], flop_images=2, out=out, console=_console())
    counted = []
    real = segmentation.flops_per_image
    monkeypatch.setattr(segmentation, "flops_per_image", lambda m, i, t, *a: counted.append(t) or real(m, i, t, *a))
    console = _console()
    with Progress(console=console) as progress:
        rows = evaluate_thresholds(model, images, labels, THRESHOLDS, flop_images=2, out=out, progress=progress)
        assert progress.tasks[0].total == 1 * (4 + 2)  # only the new threshold's work
    assert json.dumps(rows[:2]) == json.dumps(first) and counted == [0.9]  # NaN IoU of absent classes
    lines = [line for line in _lines(console) if not line.startswith("DToP")]  # not the bar's last frame
    assert lines[0] == f"reusing 2 of 3 thresholds from {out} (1, 0.98); delete it to recompute"
    assert len(lines) == 2 and LINE.match(lines[1]) and lines[1].startswith("thresh 0.9:")
    assert [json.loads(line)["thresh"] for line in out.read_text().splitlines()] == THRESHOLDS
    console = _console()
    evaluate_thresholds(model, images, labels, THRESHOLDS, flop_images=2, out=out, console=console)
    assert _lines(console) == [f"reusing 3 of 3 thresholds from {out} (1, 0.98, 0.9); delete it to recompute"]


def test_silent_without_a_console_and_clear_errors(scenes, capsys):
    model, images, labels = scenes
    evaluate_thresholds(model, images, labels, [1.0], flop_images=1)
    assert capsys.readouterr().out == ""  # library callers (training's held-out check) stay quiet
    with pytest.raises(ValueError, match="batch must be >= 1"):
        evaluate_thresholds(model, images, labels, [1.0], batch=0)
    with pytest.raises(ValueError, match="flop_images must be >= 1"):
        evaluate_thresholds(model, images, labels, [1.0], flop_images=0)
    with pytest.raises(ValueError, match="4 images but 3 label maps"):
        evaluate_thresholds(model, images, labels[:3], [1.0])


def test_dtop_cli_prints_a_line_per_threshold_and_says_what_it_reused(tmp_path):
    out = tmp_path / "dtop" / "results.jsonl"
    args = ["dtop", "--thresholds", "1.0,0.98", "--images", "4", "--flop-images", "2", "--out", str(out),
            "--pictures", "0"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("thresh ")]
    assert [line.split(":")[0] for line in lines] == ["thresh 1", "thresh 0.98"]
    assert all(re.search(r"mIoU \d\.\d{4}, \d+\.\d{4} GFLOPs/image, .* \d+\.\d s$", line) for line in lines)
    again = CliRunner().invoke(app, [*args[:2], "1.0,0.98,0.97", *args[3:]])
    assert again.exit_code == 0, again.output
    assert f"reusing2of3thresholdsfrom{out}(1,0.98)" in "".join(again.output.split())  # a long path wraps
    assert [line.split(":")[0] for line in again.output.splitlines() if line.startswith("thresh ")] == ["thresh 0.97"]
