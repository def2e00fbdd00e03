"""One model loader: sweep, report, show and the lmms-eval model fail with the same short message on a bad model."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.embedded import model_dir

runner = CliRunner()


def _squeezed(output: str) -> str:
    """Without box characters and whitespace: rich wraps long paths anywhere inside its error panel."""
    return re.sub(r"[\s│╭╮╰╯─]", "", output)


def _commands(model: str, tmp_path) -> dict[str, list[str]]:
    return {
        "sweep": ["sweep", "--model", model, "--methods", "fastv", "--keep", "8", "--limit", "2",
                  "--out", str(tmp_path / "sweep")],
        "report": ["report", "--model", model, "--methods", "fastv", "--keep", "8", "--out", str(tmp_path / "r")],
        "show": ["show", "--model", model, "--methods", "fastv", "--keep", "8", "--out", str(tmp_path / "s")],
    }  # fmt: skip


def _lmms_error(model: str) -> str:
    from vtprune.eval.lmms_model import VtpruneLMM

    with pytest.raises(ValueError) as caught:
        VtpruneLMM(pretrained=model, method="fastv", keep=8)
    return str(caught.value)


def _truncated(tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(model_dir(), folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return str(folder), f"{weights} is truncated or corrupt"


def _without_processor(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dir() / name, folder / name)
    return str(folder), "has no usable processor"


def _missing(tmp_path):
    return str(tmp_path / "no" / "such" / "checkpoint"), "no checkpoint folder at"


def _typo_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "chekpoints/llava", "is not a local folder and the hub is offline"


@pytest.mark.parametrize("case", ["missing", "typo_offline", "truncated", "without_processor"])
def test_every_command_gives_the_same_short_error(tmp_path, monkeypatch, case):
    makers = {"missing": _missing, "truncated": _truncated, "without_processor": _without_processor}
    model, message = _typo_offline(tmp_path, monkeypatch) if case == "typo_offline" else makers[case](tmp_path)
    for name, args in _commands(model, tmp_path).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and _squeezed(message) in _squeezed(result.output), (name, result.output)
        assert "Traceback" not in result.output and len(result.output.splitlines()) < 15, (name, result.output)
    assert message in _lmms_error(model)


def test_a_file_instead_of_a_folder_is_named(tmp_path):
    weights = model_dir() / "model.safetensors"
    result = runner.invoke(app, _commands(str(weights), tmp_path)["report"])
    assert result.exit_code == 2 and _squeezed("is a file; give the checkpoint's folder") in _squeezed(result.output)


@pytest.mark.parametrize("name", ["embedded", "embedded-qwen"])
def test_show_on_the_embedded_model_draws_a_digit_grid(tmp_path, name):
    result = runner.invoke(app, ["show", "--model", name, "--methods", "fastv", "--keep", "16",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fastv.png").is_file() and (tmp_path / "methods.png").is_file()
