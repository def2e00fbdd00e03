"""TransPrune: transition variation, the scaled schedule, and a reference from dense internals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import LLAVA
from vtprune.core.budget import stage_budgets
from vtprune.core.layout import Layout
from vtprune.core.registry import ModelInfo
from vtprune.methods.transprune import store_transitions, transition_variation


def test_transition_variation_norm_ratio_and_softmax():
    x = torch.randn(2, 5, 8)
    y = 2 * x  # same direction: 1 - cos = 0 for every token -> uniform softmax; norm ratio 2
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    ttv = transition_variation(x, y, valid)
    assert ttv.shape == (2, 5)
    assert_close(ttv[0], torch.full((5,), 2 / 5))
    assert_close(ttv[1], torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5]))  # padding excluded from the softmax
    z = y.clone()
    z[0, 2] = -z[0, 2]  # a token that turns around changes most
    assert int(transition_variation(x, z, valid)[0].argmax()) == 2


def _reference_variation(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TTV with plain per-sample loops and F.cosine_similarity (the formula as the authors write it)."""
    ttv = torch.zeros(valid.shape)
    for b in range(valid.shape[0]):
        real = valid[b]
        ratio = y[b, real].norm(dim=-1) / x[b, real].norm(dim=-1)
        change = 1 - F.cosine_similarity(x[b, real], y[b, real], dim=-1)
        ttv[b, real] = ratio * change.exp() / change.exp().sum()
    return ttv


def test_transition_variation_matches_the_plain_formula():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 7, 16, generator=generator), torch.randn(2, 7, 16, generator=generator)
    y[0, 3] = 0.0  # a sub-layer that outputs nothing for a token
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    assert_close(transition_variation(x, y, valid), _reference_variation(x, y, valid), rtol=1e-6, atol=1e-7)


def test_transition_totals_follow_tokens_across_compaction():
    """observe() sums per slot and moves the sums to prompt positions at each compaction: the totals equal a plain
    per-token sum of every sub-layer's TTV over the tokens still present."""
    generator = torch.Generator().manual_seed(0)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    token = torch.where(valid, torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]]), -1)
    item = torch.where(valid, torch.tensor([[-1, 0, 0, 0, 0, -1], [-1, -1, 1, 1, 1, -1]]), -1)
    layout = Layout(token, valid, item, item, token.clamp(min=0), torch.zeros(2, dtype=torch.long), 0)
    method, state = vtprune.TransPrune(), {}
    expected = torch.zeros(2, 6)
    for step in range(3):  # two sub-layers on each layout, compacting between
        for part in ("attention", "mlp"):
            x = torch.randn(2, layout.length, 8, generator=generator)
            y = torch.randn(2, layout.length, 8, generator=generator)
            method.observe(state, step, part, x, y, layout)
            reference = _reference_variation(x, y, layout.valid)
            for b in range(2):
                real = layout.valid[b]
                expected[b, layout.token[b, real]] += reference[b, real]
        keep = layout.valid & ~((layout.item >= 0) & (layout.token == layout.token.max(1, keepdim=True).values - 1 - step))
        layout = layout.compact(keep, renumber=True, first_layer=step + 1)
    totals = store_transitions(state["ttv"])[:, :6]
    for b in range(2):
        present = layout.token[b, layout.valid[b]]  # only tokens that were never dropped carry every layer's TTV
        assert_close(totals[b, present], expected[b, present], rtol=1e-5, atol=1e-7)


def test_transprune_schedule_on_32_layers_and_scaled():
    stages = vtprune.TransPrune().stages(LLAVA, 72)
    assert [s.layer for s in stages] == [7, 9, 12]
    assert all(s.attention_from == s.layer and s.query == "instruction" for s in stages)
    budgets = stage_budgets(72, 576, [(s.layer, s.scale) for s in stages], 32)
    assert budgets == [504, 360, 72]  # 576 -> 504 -> 360 -> 72
    assert stage_budgets(0.125, 576, [(s.layer, s.scale) for s in stages], 32) == [504, 360, 72]
    assert vtprune.TransPrune().observed_layers(LLAVA) == tuple(range(6, 12))  # layers 7..12, 1-based
    tiny = ModelInfo(family="llava", num_layers=4, has_cls_token=True, mrope=False)
    assert tiny.scale_layers((7, 9, 12)) == [1, 2, 3]
    assert LLAVA.scale_layers((7, 9, 12)) == [7, 9, 12]
    assert [s.attention_from for s in vtprune.TransPrune(ttv_only=True).stages(LLAVA, 72)] == [None] * 3


def test_transprune_matches_a_reference_from_dense_internals():
    """One stage after layer 2 (1-based): TTV of layers 1-2 plus instruction attention of layer index 2."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2], padding_side="right"))
    layers = model.model.language_model.layers
    transitions = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        transitions.append((x, output[0] if isinstance(output, tuple) else output))

    hooks = [m.register_forward_hook(record, with_kwargs=True) for i in (0, 1) for m in (layers[i].self_attn, layers[i].mlp)]
    dense = model(**batch, output_attentions=True)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    ttv = torch.zeros(mask.shape)
    for x, y in transitions:  # plain per-sample loops
        for b in range(2):
            real = mask[b]
            ratio = y[b, real].norm(dim=-1) / x[b, real].norm(dim=-1)
            change = 1 - F.cosine_similarity(x[b, real], y[b, real], dim=-1)
            ttv[b, real] += ratio * change.exp() / change.exp().sum()
    attention = dense.attentions[2].mean(1)  # layer index 2 sees the unpruned sequence
    visual = visual_mask(batch)
    keep = 6
    with vtprune.wrap(model, "transprune", keep=keep, prune_layers=(2,), ratios=(0.25,), accumulate_from=1) as pruning:
        model(**batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)
        instruction = [p for p in range(int(positions.max()) + 1, int(mask[b].sum()))]
        iga = attention[b, instruction][:, positions].mean(0)
        for image in range(len(positions) // 64):
            span = slice(64 * image, 64 * (image + 1))
            t, a = ttv[b, positions[span]], iga[span]
            score = t / (t.sum() + 1e-8) + a / (a.sum() + 1e-8)
            assert torch.equal(next(kept), score.topk(keep).indices.sort().values)
