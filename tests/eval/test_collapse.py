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
