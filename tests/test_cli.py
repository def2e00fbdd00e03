from typer.testing import CliRunner

from vtprune.cli import app

runner = CliRunner()


def _text(output: str) -> str:
    """The output with rich's box drawing and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def test_tour_prints_kept_tokens_and_sequence_lengths():
    result = runner.invoke(app, ["tour", "--family", "llava", "--keep", "16"])
    assert result.exit_code == 0, result.output
    assert "16/64, 16/64, 16/64" in result.output
    assert "140 140 44 44" in result.output  # fastv prunes at layer 2: 3 images x 48 tokens fewer
    assert "44 44 44 44" in result.output  # random/uniform prune before the LLM


def test_tour_covers_every_family():
    from vtprune.testing import FAMILIES
    from vtprune.tour import PROMPTS

    from vtprune.cli import MODEL_HELP

    assert set(PROMPTS) == set(FAMILIES) and all(family in MODEL_HELP for family in FAMILIES)
    result = runner.invoke(app, ["tour", "--family", "glm4v,smolvlm,paligemma", "--methods", "fastv"])
    assert result.exit_code == 0, result.output
    for name in ("Glm4vForConditionalGeneration", "SmolVLMForConditionalGeneration", "PaliGemmaForConditionalGeneration"):
        assert name in result.output


def test_tour_rejects_bad_arguments():
    result = runner.invoke(app, ["tour", "--family", "gpt"])
    assert result.exit_code != 0 and "unknown family gpt" in _text(result.output)
    result = runner.invoke(app, ["tour", "--family", "llava", "--keep", "0"])
    assert result.exit_code != 0 and "keep must be" in _text(result.output)
    result = runner.invoke(app, ["tour", "--family", "llava", "--methods", "nope"])
    assert result.exit_code != 0 and "unknown method 'nope'" in _text(result.output)


def test_methods_lists_the_registry():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("fastv", "random", "uniform"):
        assert name in result.output


def test_demo_rejects_a_bad_budget_or_model_once_before_any_work(tmp_path):
    result = runner.invoke(app, ["demo", "--keep", "8,0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "keep must be an int >= 1" in _text(result.output), result.output
    assert "skipped" not in result.output  # checked before the methods are probed at that budget
    result = runner.invoke(app, ["demo", "--model", "tiny:llava", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "model must be one of embedded, embedded-qwen" in _text(result.output)
    assert not list(tmp_path.iterdir())
