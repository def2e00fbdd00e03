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
from vtprune.core.registry import ModelInfo
from vtprune.methods.transprune import transition_variation


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
