"""Cost reports on videos: frames, video tokens per frame before and after pruning, prefill FLOPs per frame."""

from __future__ import annotations

import pytest

from tests.helpers import Image, Video, make_batch, tiny_model
from vtprune.eval.report import build_report, video_fields


def test_video_fields_count_frames_of_whole_videos_and_of_frame_items():
    items = [
        {"sample": 0, "modality": "image", "num_tokens": 16},
        {"sample": 0, "modality": "video", "num_tokens": 48, "frames": [16, 16, 16]},  # budget_unit="video"
        {"sample": 1, "modality": "video", "num_tokens": 16},  # budget_unit="frame": one frame per item
        {"sample": 1, "modality": "video", "num_tokens": 16},
    ]
    fields = video_fields(items, kept=[16, 20, 4, 6], prefill_flops=10e12)
    assert fields == {
        "video_frames": 5,
        "video_tokens_per_frame_before": 16.0,
        "video_tokens_per_frame": 6.0,  # (20 + 4 + 6) / 5: the image's tokens are not counted
        "tflops_per_frame": 2.0,
    }
    assert video_fields(items[:1], kept=[16], prefill_flops=1e12) == {}  # no video: no per-frame fields


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_on_a_qwen_video_gives_tokens_and_flops_per_frame():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 16)), 2, Image((16, 16)), 4]])
    report = build_report(model, batch, ["evs"], [0.5], new_tokens=1, warmup=0, repeats=1)
    dense, evs = report.rows
    per_frame = dense["video_tokens_per_frame_before"]
    assert dense["video_frames"] == evs["video_frames"] == 4
    assert dense["video_tokens_per_frame"] == per_frame == evs["video_tokens_per_frame_before"]
    # EVS keeps int(4 * N * 0.5) of the video: half its tokens per frame on average
    assert evs["video_tokens_per_frame"] == int(4 * per_frame * 0.5) / 4
    assert evs["tflops_per_frame"] == pytest.approx(evs["tflops_prefill"] / 4)
    assert evs["tflops_per_frame"] < dense["tflops_per_frame"]
    headers = [column.header for column in report.table().columns]
    assert "video tok\n/ frame" in headers and "GFLOPs\n/ frame" in headers


def test_image_only_reports_have_no_per_frame_columns():
    model = tiny_model("llava")
    report = build_report(model, make_batch(model, [[3, Image(), 4]]), ["random"], [8], new_tokens=1, warmup=0, repeats=1)
    assert all("video_frames" not in row for row in report.rows)
    assert "video tok\n/ frame" not in [column.header for column in report.table().columns]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from PIL import Image as PILImage

    folder = tmp_path_factory.mktemp("frames")
    for index in range(4):  # named so that name order is time order
        PILImage.new("RGB", (32, 32), (60 * index, 30, 90)).save(folder / f"frame_{index:02d}.png")
    return folder


def _cli(*args: str):
    from typer.testing import CliRunner

    from vtprune.cli import app

    return CliRunner().invoke(app, ["report", *args, "--repeats", "1", "--warmup", "0", "--new-tokens", "1"])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["random model", "checkpoint"])
def test_report_cli_measures_a_video_of_frames(tmp_path, frames, kind):
    import json

    from vtprune.testing import save_tiny_checkpoint

    model = "tiny:qwen2_vl" if kind == "random model" else str(save_tiny_checkpoint("qwen2_vl", tmp_path / "ckpt"))
    out = tmp_path / "report"
    result = _cli("--model", model, "--video", str(frames), "--methods", "evs", "--keep", "0.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["rows"]
    dense, evs = rows
    assert dense["video_frames"] == evs["video_frames"] == 2  # 4 raw frames: 2 temporal slices on Qwen
    assert evs["video_tokens_per_frame"] == dense["video_tokens_per_frame_before"] / 2  # EVS at 0.5: half the video
    assert json.loads((out / "report.json").read_text())["context"]["budget_unit"] == "video"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "tiny:llava", "--video", "FRAMES"], "LLaVA-1.5 takes no video input"),
        (["--model", "tiny:qwen2_vl", "--video", "/nonexistent/frames"], "is not a folder of frame images"),
        (["--model", "tiny:qwen2_vl", "--video", "FRAMES", "--image", "FRAMES"], "--image or --video, not both"),
        (["--model", "tiny:qwen2_vl", "--video", "FRAMES", "--methods", "evs", "--budget-unit", "frame"],
         "budget_unit 'video', not 'frame'"),
    ],
)
def test_report_cli_rejects_bad_video_input_before_measuring(tmp_path, frames, args, message):
    args = [str(frames) if a == "FRAMES" else a for a in args]
    result = _cli(*args, "--out", str(tmp_path / "r"))
    assert result.exit_code != 0 and message in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "r" / "report.json").exists()
