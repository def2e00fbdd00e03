"""``vtprune report`` / ``vtprune show``, their Python twins, and loading checkpoints through ``from_pretrained``."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

import vtprune
from tests.helpers import Image, make_batch, tiny_model
from vtprune.cli import app
from vtprune.eval.inputs import load_model, prepare_inputs
from vtprune.eval.show import kept_mask, show
from vtprune.testing import save_tiny_checkpoint

runner = CliRunner()


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """Left half red, right half blue: which half a cell shows is known."""
    path = tmp_path_factory.mktemp("img") / "halves.png"
    image = PILImage.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.save(path)
    return path


def test_report_cli_writes_table_json_csv_and_plot(tmp_path):
    out = tmp_path / "rep"
    args = ["report", "--model", "tiny:llava", "--methods", "fastv,random", "--keep", "16,4", "--out", str(out),
            "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fastv" in result.output and "prefill" in result.output and "born-short" in result.output
    data = json.loads((out / "report.json").read_text())
    assert [(r["method"], r["keep"]) for r in data["rows"]] == [
        ("dense", None), ("fastv", 16), ("fastv", 4), ("random", 16), ("random", 4),
    ]  # fmt: skip
    assert data["context"]["model"] == "tiny:llava"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 5 and float(rows[4]["tflops_prefill"]) < float(rows[0]["tflops_prefill"])
    # timing honesty: how many runs each figure comes from, their min / median / max, and the noise verdict
    assert "1 timed run after 0 warm-up" in _text(result.output) and "spread is unknown" in _text(result.output)
    assert {(row["repeats"], row["warmup"]) for row in data["rows"]} == {(1, 0)}
    assert data["rows"][1]["prefill_ms_min"] == data["rows"][1]["prefill_ms"] == data["rows"][1]["prefill_ms_max"]
    assert "noisy" in data["context"] and {"prefill_ms_min", "prefill_ms_max", "noisy"} <= set(rows[0])
    with PILImage.open(out / "report.png") as png:
        assert png.size[0] > 800


def test_report_cli_warns_when_the_dense_control_disagrees_with_itself(tmp_path, monkeypatch):
    """The issue's CPU runs: dense pruned / born-short 1.51 (identical work) must not pass silently."""
    from vtprune.eval import report as report_module
    from vtprune.eval.latency import Timing

    real_measure = report_module.measure

    def steady(*args, **kwargs):  # the model runs (its record is needed), but every run takes the same time
        measured = real_measure(*args, **kwargs)
        for name, ms in (("vision_ms", 2.0), ("prefill_ms", 10.0), ("llm_prefill_ms", 7.55),
                         ("decode_ms_per_token", 1.0), ("end_to_end_ms", 20.0)):  # fmt: skip
            setattr(measured, name, Timing([ms] * 3))
        return measured

    monkeypatch.setattr(report_module, "measure", steady)
    monkeypatch.setattr(report_module, "time_language_model", lambda *a, **k: Timing([5.0] * 3))  # 7.55 / 5 = 1.51
    out = tmp_path / "rep"
    args = ["report", "--model", "tiny:llava", "--methods", "fastv", "--keep", "16", "--out", str(out),
            "--repeats", "3", "--warmup", "0", "--new-tokens", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = _text(result.output)
    assert "3 timed runs after 0 warm-up" in text and "WARNING: timings are NOISY" in text
    assert "more --repeats" in text and "--warmup" in text and "quiet machine" in text
    data = json.loads((out / "report.json").read_text())
    assert data["context"]["noisy"] is True and data["rows"][0]["noisy"] is True
    assert data["rows"][0]["repeats"] == 3 and not data["rows"][1]["noisy"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--keep", "0"], "keep must be"),
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--model", "tiny:gpt"], "tiny:llava"),
        (["--model", "tiny:qwen2_vl", "--methods", "vtc_cls"], "no [CLS] token"),
    ],
)
def test_report_cli_rejects_bad_input_before_measuring(tmp_path, args, message):
    result = runner.invoke(app, ["report", "--model", "tiny:llava", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code != 0 and message in _text(result.output)
    assert not (tmp_path / "r" / "report.json").exists()


def test_show_cli_writes_one_picture_per_method_and_a_strip(tmp_path, picture):
    out = tmp_path / "show"
    args = ["show", "--image", str(picture), "--model", "tiny:llava", "--methods", "vtc_cls,fastv,pool",
            "--keep", "16", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("vtc_cls", "fastv", "pool", "methods"):
        with PILImage.open(out / f"{name}.png") as png:
            assert png.size[0] > 200
    result = runner.invoke(app, [*args[:-2], "--out", str(out), "--model", "tiny:qwen2_vl"])
    assert result.exit_code != 0 and "no [CLS] token" in _text(result.output)


def test_picture_replaces_the_random_pixels(picture):
    for family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
        model = tiny_model(family)
        inputs = prepare_inputs(model, None, image=picture)
        image = vtprune.adapter_for(model).display_image(inputs, 0)
        width = image.shape[2]
        left, right = image[:, :, : width // 2 - 1].mean((1, 2)), image[:, :, width // 2 + 1 :].mean((1, 2))
        assert left[0] > left[2] and right[2] > right[0], family


def test_kept_mask_marks_exactly_the_kept_cells():
    model = tiny_model("llava")  # one 8 x 8 grid
    batch = make_batch(model, [[5, Image(), 7]])
    with vtprune.wrap(model, "uniform", keep=16) as pruning, torch.no_grad():
        model(**batch)
    kept, merged = kept_mask(pruning.last)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[pruning.last.stages[-1].kept_per_item[0]] = True
    assert torch.equal(kept.flatten(), expected) and kept.sum() == 16 and not merged.any()
    assert kept.any(1).sum() == 4 and kept.any(0).sum() == 4  # uniform keeps a regular 4 x 4 lattice
    with vtprune.wrap(model, "visionzip", keep=16) as pruning, torch.no_grad():
        model(**batch)
    kept, merged = kept_mask(pruning.last)
    # VisionZip's 16 = dominant tokens (own features) + contextual tokens and the [CLS] carrier (merged features)
    assert kept.sum() == 16 and 0 < merged.sum() < 16 and not (merged & ~kept).any()
    with vtprune.wrap(model, "pool", keep=16) as pruning, torch.no_grad():
        model(**batch)
    kept, merged = kept_mask(pruning.last)
    assert torch.equal(kept, merged)  # every pooled token carries a mean
    with pytest.raises(ValueError, match="grid=3"):
        kept_mask(pruning.last, grid=3)


def test_show_marks_re_encoded_images(tmp_path):
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[5, Image(size=(32, 32)), 7]])
    written = show(model, batch, ["downsample", "random"], 16, tmp_path)
    assert [p.name for p in written] == ["downsample.png", "random.png", "methods.png"]
    with vtprune.wrap(model, "downsample", keep=16) as pruning, torch.no_grad():
        model(**batch)
    assert kept_mask(pruning.last) is None


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_checkpoint_path_loads_with_its_processor_and_chat_template(tmp_path, picture, family):
    """The from_pretrained path users with weights take: a saved checkpoint, its processor and chat template."""
    path = save_tiny_checkpoint(family, tmp_path / "ckpt")
    model, processor = load_model(str(path))
    assert processor is not None and type(model).__name__ == type(tiny_model(family)).__name__
    inputs = prepare_inputs(model, processor, image=picture, prompt="w5 w6 w7")
    assert processor.tokenizer.decode(inputs["input_ids"][0, -4:]) == "w5 w6 w7 w5"  # the question, then the template
    with vtprune.wrap(model, "fastv", keep=8) as pruning:
        model.generate(**inputs, max_new_tokens=2, pad_token_id=0)
    assert [k.numel() for k in pruning.last.stages[-1].kept_per_item] == [8]
    with pytest.raises(ValueError, match="image is required"):
        prepare_inputs(model, processor)
    out = tmp_path / "show"
    result = runner.invoke(app, ["show", "--model", str(path), "--image", str(picture), "--methods", "random",
                                 "--keep", "8", "--out", str(out), "--prompt", "w9"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "random.png").exists()
