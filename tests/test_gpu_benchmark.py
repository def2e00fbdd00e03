"""benchmarks/gpu.py and benchmarks/gpu.sh stay runnable without a GPU: the --tiny run writes its three files with
the expected keys and columns, the time guard skips and writes, gpu.sh explains itself and dry-runs without
wheels, and the Qwen prompt matches the Qwen2.5-VL processor's resize."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
SHELL = ROOT / "benchmarks" / "gpu.sh"
ROW_KEYS = (
    "prefill_ms", "vision_ms", "llm_prefill_ms", "born_short_llm_ms", "pruned_vs_born_short", "prefill_vs_floor",
    "ttft_ms", "kv_cache_bytes", "peak_memory_bytes", "tflops_prefill", "visual_tokens", "llm_tokens",
)  # fmt: skip
METHOD_KEYS = ("predicted_speedup", "realized_speedup", "realized_vs_predicted", "overhead_share", "pre_llm")
MD_COLUMNS = (
    "prefill ms", "predicted speed-up", "realized speed-up", "realized / predicted", "pruned / born-short (LLM)",
    "prefill / floor", "overhead / dense prefill", "TTFT ms", "decode tok/s", "peak GiB", "KV MiB",
)  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _module():
    spec = importlib.util.spec_from_file_location("vtprune_gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One --tiny run for the checks below: FastV (in-LLM, attention-scored) and VisionZip (pre-LLM, needs [CLS]:
    refused on Qwen), batches 1 and 2, both models. The budget is generous: on a loaded CPU the guard would
    otherwise skip rows this test looks at."""
    out = tmp_path_factory.mktemp("gpu")
    done = _run([sys.executable, str(SCRIPT), "--tiny", "--quick", "--methods", "fastv,visionzip", "--batches", "1,2",
                 "--repeats", "1", "--new-tokens", "3", "--budget", "900", "--out", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "plan (" in done.stdout and "estimated total" in done.stdout  # the estimate prints before any run
    return out


def test_tiny_json(tiny_run: Path) -> None:
    data = json.loads((tiny_run / "gpu.json").read_text())
    assert set(data) >= {"context", "plan", "rows", "eager", "kernels", "skipped", "errors", "phases", "floors"}
    assert data["errors"] == [], data["errors"]
    assert data["context"]["finished"] is True
    assert data["context"]["device"].startswith("CPU") and data["context"]["dtype"] == "float32"
    rows = {(r["model"], r["batch"], r["method"]): r for r in data["rows"]}
    expected = {(m, b, x) for b in (1, 2) for m, x in (("llava", "dense"), ("llava", "fastv"), ("llava", "visionzip"),
                                                       ("qwen", "dense"), ("qwen", "fastv"))}  # fmt: skip
    assert set(rows) == expected, sorted(rows)
    assert any("qwen/visionzip: does not apply" in s for s in data["skipped"])
    for key, row in rows.items():
        assert all(k in row for k in ROW_KEYS), (key, sorted(row))
        assert row["prefill_ms"] > 0 and row["kv_cache_bytes"] > 0
        if key[2] != "dense":
            assert all(k in row for k in METHOD_KEYS), (key, sorted(row))
    # the budgets: 64 of 576 on LLaVA, a quarter of Qwen's 144 image tokens (448 x 252 px at --tiny)
    assert rows[("llava", 1, "visionzip")]["visual_tokens"] == 64 and rows[("llava", 1, "visionzip")]["pre_llm"]
    assert rows[("llava", 2, "fastv")]["visual_tokens"] == 64 and not rows[("llava", 2, "fastv")]["pre_llm"]
    assert rows[("qwen", 1, "fastv")]["visual_tokens"] == 36
    assert rows[("llava", 1, "visionzip")]["predicted_speedup"] > rows[("llava", 1, "fastv")]["predicted_speedup"] > 1
    # decode is measured at the smallest budget for dense and each method
    assert rows[("llava", 1, "fastv")]["decode_tokens_per_s"] > 0 and rows[("llava", 2, "dense")]["generate_ms"] > 0
    # FastV scores by the LLM's attention: its eager reference selects the same tokens (float32 on the CPU)
    eager = {(e["model"], e["batch"], e["method"]): e for e in data["eager"]}
    assert {("llava", 1, "fastv"), ("llava", 2, "fastv"), ("llava", 1, "dense")} <= set(eager)
    assert eager[("llava", 1, "fastv")]["same_selection"] == 1.0
    assert ("llava", 1, "visionzip") not in eager  # tower attention: no eager reference
    # the floors of the plot: every budget plus the dense end, FLOPs-predicted speed-up 1 there
    floors = data["floors"]["llava/1"]
    assert [f["visual_tokens"] for f in floors] == [64, 576] and floors[-1]["predicted"] == pytest.approx(1.0)
    # (VisionZip's projector also runs on the 64 kept rows only: a small difference from the floor's FLOPs)
    assert floors[0]["predicted"] == pytest.approx(rows[("llava", 1, "visionzip")]["predicted_speedup"], rel=0.05)
    # kernels: the torch reference and the Triton kernel (interpreter) per op, with bandwidth columns
    ops = {k["op"]: k for k in data["kernels"]}
    assert set(ops) == {"gather_tokens", "compact_kv", "merge_tokens"}
    for op in ops.values():
        assert op["torch_gbps"] > 0 and "triton_pct_nominal" in op and op["max_abs_diff"] < 1e-4, op


def test_tiny_markdown_and_png(tiny_run: Path) -> None:
    text = (tiny_run / "gpu.md").read_text()
    for heading in ("## LLaVA-1.5-7B, batch 1", "## LLaVA-1.5-7B, batch 2", "## Qwen2.5-VL-7B, batch 1",
                    "## Attention-score methods", "## Kernels", "## Goals"):  # fmt: skip
        assert heading in text, heading
    header = next(line for line in text.splitlines() if line.startswith("| method | keep |"))
    for column in MD_COLUMNS:
        assert f"| {column} |" in header, column
    assert "| fastv | 64 |" in text and "| fastv | 1/4 |" in text
    assert "vtprune FastV (SDPA) faster than the eager reference" in text

    from matplotlib.image import imread

    image = imread(tiny_run / "gpu.png")[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 600
    ink = (image < 0.9).any(axis=-1).mean()  # share of non-white pixels: axes, lines, markers, text
    colours = len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 50, (ink, colours)


def test_time_guard_skips_and_writes(tmp_path: Path) -> None:
    """A budget already spent by the imports: every row is skipped, each with its reason, and the files are still
    written."""
    done = _run([sys.executable, str(SCRIPT), "--tiny", "--quick", "--methods", "fastv", "--models", "llava",
                 "--budget", "1", "--out", str(tmp_path)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["rows"] == [] and data["errors"] == []
    # skipped by the guard, or (on a machine so loaded that the imports outlast the grace) stopped by the alarm
    assert any("would not fit" in s or "stopped: hard time limit" in s for s in data["skipped"]), data["skipped"]
    assert "## Skipped" in (tmp_path / "gpu.md").read_text()
    assert (tmp_path / "gpu.png").stat().st_size > 0


def test_hard_alarm_interrupts() -> None:
    """The alarm past the budget raises TimeUp (a BaseException, so no per-row handler swallows it)."""
    gpu = _module()
    if not hasattr(signal, "SIGALRM"):
        pytest.skip("no SIGALRM on this platform")
    previous = signal.getsignal(signal.SIGALRM)
    clock = gpu.Clock(1.0 - gpu.HARD_GRACE_S)
    clock.start = time.monotonic()
    try:
        clock.arm()
        with pytest.raises(gpu.TimeUp):
            time.sleep(10)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not issubclass(gpu.TimeUp, Exception)


def test_qwen_prompt_matches_the_processor_resize() -> None:
    """1280 x 720 becomes 1288 x 728 px = 92 x 52 patches = 1196 merged tokens, as Qwen2.5-VL's processor resizes."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    gpu = _module()
    assert gpu.qwen_grid(720, 1280, 28) == smart_resize(720, 1280, factor=28) == (728, 1288)
    assert gpu.qwen_grid(252, 448, 28) == smart_resize(252, 448, factor=28)


def test_gpu_sh_help() -> None:
    done = _run(["bash", str(SHELL), "--help"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: bash benchmarks/gpu.sh" in done.stdout and "--wheels DIR" in done.stdout
    assert "--tiny" in done.stdout and "--quick" in done.stdout  # gpu.py's own options follow


def test_gpu_sh_dry_run_without_and_with_wheels(tmp_path: Path) -> None:
    """No wheels: it says it uses the interpreter's transformers and prints the full-size plan; with a wheel folder it
    prints the install it would run. Nothing is installed or measured."""
    empty = tmp_path / "none"
    empty.mkdir()
    env = {**_env(), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SHELL), "--dry-run", "--wheels", str(empty), "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no wheels" in done.stdout and "plan (full-size plan" in done.stdout and "estimated total" in done.stdout
    assert "transformers 5." in done.stdout  # the version line
    assert (tmp_path / "out" / "gpu.log").read_text().count("gpu.sh:") >= 3
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "transformers-5.23.0-py3-none-any.whl").write_bytes(b"")
    done = subprocess.run(["bash", str(SHELL), "--dry-run", "--wheels", str(wheels), "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "would run:" in done.stdout and "--no-index --no-deps" in done.stdout
