"""find_collapse_layer: the entropy report, its plot, and no hooks left behind."""

from __future__ import annotations

from tests.helpers import make_batch, samples_for, tiny_model
from vtprune.eval.collapse import find_collapse_layer


def test_find_collapse_layer_reports_and_plots(tmp_path):
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    model(**batch)  # transformers installs its own output-capturing hooks on first use
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    report = find_collapse_layer(model, batch, plot=tmp_path / "entropy.png")
    assert len(report.entropy) == 4 and 1 <= report.collapse_layer < 4
    drops = [report.entropy[i - 1] - report.entropy[i] for i in range(1, 4)]
    assert report.collapse_layer == 1 + max(range(3), key=lambda i: drops[i])
    assert report.plot.exists() and report.plot.stat().st_size > 1000
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_find_collapse_layer_measures_only_softmax_attention_layers():
    """Qwen3.5's linear-attention layers have no query states: NaN there, the collapse at a full-attention layer,
    and the gated q_proj's gate half left out of the entropy."""
    model = tiny_model("qwen3_5", num_layers=6)
    batch = make_batch(model, samples_for("qwen3_5")[:1])
    report = find_collapse_layer(model, batch)
    full = [i for i, t in enumerate(model.config.text_config.layer_types) if t == "full_attention"]
    assert [i for i, e in enumerate(report.entropy) if e == e] == full  # NaN != NaN
    assert report.collapse_layer in full[1:]
    assert report.drops[full[1]] == report.entropy[full[0]] - report.entropy[full[1]]
