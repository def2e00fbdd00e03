"""ATP-LLaVA: the threshold rule on hand-made scores, weights, keep extremes, batching, and the shipped weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vtprune
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import GridPart, Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage
from vtprune.core.weights import ModuleCache, load_weights, save_weights
from vtprune.embedded import trained_dir
from vtprune.embedded.train import prompt_batch
from vtprune.methods.atp import (
    SPATIAL_SCORE,
    ATPLLaVA,
    ATPModules,
    _AllTokens,
    build_modules,
    lattice_tokens,
    normalised_log,
)
from vtprune.train.common import evaluate, held_out_docs, load_frozen

EMBEDDED_INFO = ModelInfo(family="llava", num_layers=8, has_cls_token=True, mrope=False, hidden_size=192)
SHIPPED = trained_dir("atp")


@pytest.fixture(scope="module")
def frozen():
    return load_frozen()


def constant_weights(folder, theta_r: float, theta_s_logit: float):
    """Weights whose every stage outputs ``theta_r`` and ``sigmoid(theta_s_logit)`` whatever the image."""
    modules = ATPModules(3, 4)
    with torch.no_grad():
        for net in modules.stages:
            net.net[0].weight.zero_()
            net.net[0].bias.zero_()  # GELU(0) = 0: the output is the last layer's bias
            net.net[2].bias.copy_(torch.tensor([theta_r, theta_s_logit]))
    meta = {"method": "atp", "hidden_size": 192, "num_layers": 8, "trained_on": "test", "layers": [1, 4, 6],
            "width": 4}  # fmt: skip
    return save_weights(folder, modules.state_dict(), meta), modules


def hand_context(attention: torch.Tensor, keep: float) -> PruneContext:
    """One sample: a 4 x 4 image (slots 0-15) then two instruction tokens; ``attention`` [18, 18]."""
    n, length = 16, 18
    item = VisualItem(0, 0, "image", n, 0, (GridPart(0, 4, 4, 4),))
    view = ItemView(item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), n)
    layout = Layout(
        token=torch.arange(length)[None], valid=torch.ones(1, length, dtype=torch.bool),
        item=torch.tensor([[0] * n + [-1, -1]]), item_token=torch.tensor([list(range(n)) + [-1, -1]]),
        positions=torch.arange(length)[None], shift=torch.zeros(1, dtype=torch.long), first_layer=0,
    )  # fmt: skip
    def rows(slots: torch.Tensor, real: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        return attention[slots] * real[..., None].float()

    stage = Stage(layer=1, attention_from=0, dynamic=True, budget_rule=_AllTokens(keep))
    signals = Signals(attention_rows=rows)
    return PruneContext(stage=stage, model=EMBEDDED_INFO, layout=layout, items=[view], signals=signals)


def test_rule_keeps_tokens_above_theta_r_plus_the_lattice(tmp_path):
    torch.manual_seed(0)
    attention = torch.rand(18, 18)
    ctx = hand_context(attention, 0.25)
    s_self = attention[:16, :16].mean(0)
    s_cross = attention[16:, :16].mean(0)
    ones = torch.ones(16)
    s_red = (normalised_log(s_self, ones) + normalised_log(s_cross, ones)) / 2
    on_lattice = lattice_tokens(ctx.items[0].item)
    assert on_lattice.sum() == 4 and on_lattice.tolist() == [i in (5, 7, 13, 15) for i in range(16)]
    theta_r = float(s_red.median())
    # theta_s above the lattice's spatial score: the redundancy rule alone
    path, _ = constant_weights(tmp_path / "a", theta_r, 2.0)
    kept = ATPLLaVA(weights=str(path)).select(ctx)[0]
    assert kept.tolist() == (s_red > theta_r).nonzero().squeeze(1).tolist()
    # theta_s below it (sigmoid(-3) = 0.047 < 0.25): the lattice joins
    path, _ = constant_weights(tmp_path / "b", theta_r, -3.0)
    kept = ATPLLaVA(weights=str(path)).select(ctx)[0]
    assert kept.tolist() == ((s_red > theta_r) | on_lattice).nonzero().squeeze(1).tolist()
    assert SPATIAL_SCORE == pytest.approx(0.25)
    # nothing passes: the highest S_red stays
    path, _ = constant_weights(tmp_path / "c", 100.0, 5.0)
    kept = ATPLLaVA(weights=str(path)).select(ctx)[0]
    assert kept.tolist() == [int(s_red.argmax())]
    # keep = 1.0: everything, whatever the thresholds
    assert ATPLLaVA(weights=str(path)).select(hand_context(attention, 1.0))[0].tolist() == list(range(16))


def test_weights_round_trip(tmp_path):
    path, modules = constant_weights(tmp_path, 0.3, -1.0)
    _, meta = load_weights("atp", path)
    assert meta["layers"] == [1, 4, 6] and meta["hidden_size"] == 192 and meta["width"] == 4
    loaded = ModuleCache().get(path, build_modules, torch.device("cpu"), torch.float32)
    for (name, a), (_, b) in zip(modules.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_errors_bad_path_and_wrong_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ATPLLaVA(weights=str(tmp_path / "nowhere")).stages(EMBEDDED_INFO, 16)
    path, _ = constant_weights(tmp_path, 0.0, 0.0)
    wide = ModelInfo(family="llava", num_layers=8, has_cls_token=True, mrope=False, hidden_size=256)
    with pytest.raises(ValueError, match="width 192"):
        ATPLLaVA(weights=str(path)).stages(wide, 16)
    stages = ATPLLaVA(weights=str(path)).stages(EMBEDDED_INFO, 16)
    assert [(s.layer, s.attention_from, s.dynamic) for s in stages] == [(1, 0, True), (4, 3, True), (6, 5, True)]


def left_padded(processor, docs):
    return prompt_batch(processor, docs)[0]


def test_keep_all_is_dense_and_batch_matches_single(frozen):
    model, processor = frozen
    docs = [d for d in held_out_docs(40) if d["type"] in ("cell", "count")][:2]
    batch = left_padded(processor, docs)
    assert batch["attention_mask"].sum(1).unique().numel() == 2  # two prompt lengths: real left padding
    with torch.no_grad():
        dense = model(**batch).logits[:, -1]
        for keep in (1.0, 64):
            with vtprune.wrap(model, "atp", keep):
                torch.testing.assert_close(model(**batch).logits[:, -1], dense)
        with vtprune.wrap(model, "atp", 16) as handle:
            together = model(**batch).logits[:, -1]
            kept = [len(k) for k in handle.last.stages[-1].kept_per_item]
            for i, doc in enumerate(docs):
                alone = model(**left_padded(processor, [doc])).logits[:, -1]
                torch.testing.assert_close(alone[0], together[i], atol=1e-4, rtol=1e-4)
                assert len(handle.last.stages[-1].kept_per_item[0]) == kept[i]


def test_counts_are_instance_wise(frozen):
    model, processor = frozen
    with torch.no_grad(), vtprune.wrap(model, "atp", 16) as handle:
        model(**left_padded(processor, held_out_docs(8)))
    counts = {len(k) for k in handle.last.stages[0].kept_per_item}
    assert len(counts) > 1 and min(counts) >= 1


def test_smoke_training_writes_loadable_weights(tmp_path, frozen):
    from vtprune.train.atp import train

    record = train(steps=2, batch=2, eval_docs=0, out=tmp_path, log=lambda entry: None)
    assert record["recipe"]["steps"] == 2 and (tmp_path / "training.json").exists()
    model, processor = frozen
    with torch.no_grad(), vtprune.wrap(model, "atp", 16, weights=str(tmp_path)) as handle:
        model(**left_padded(processor, held_out_docs(2)))
    assert all(len(k) >= 1 for k in handle.last.stages[0].kept_per_item)


def test_shipped_weights_reproduce_training_json(frozen):
    record = json.loads((SHIPPED / "training.json").read_text())
    model, processor = frozen
    docs = held_out_docs(record["recipe"]["eval_docs"])
    result = evaluate(model, processor, docs, "atp", 16)
    want = record["held_out"]["atp"]["16"]
    assert math.isclose(result["accuracy"]["mean over types"], want["accuracy"]["mean over types"], abs_tol=0.02)
    assert math.isclose(result["visual_tokens_per_layer"], want["visual_tokens_per_layer"], abs_tol=1.0)
