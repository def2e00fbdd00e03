"""VisPruner: important tokens by [CLS] attention + diverse ones by iterative de-duplication, against the authors' loop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.vispruner  # registers "vispruner" (not yet imported by vtprune.methods)
from tests.helpers import FAMILIES, inapplicable, make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA, QWEN, _single_item_context, _tower_cls_attention
from vtprune.core.registry import Stage
from vtprune.methods.vispruner import VisPruner, important_and_diverse


def test_vispruner_drops_the_residual_tokens_that_duplicate_others():
    # 12 tokens, attention falling with the index: 0, 1 are important (budget 8, ratio 0.25 -> 2 + 6 diverse).
    # Residual 2..11 splits into A = 2, 4, 6, 8, 10 and B = 3, 5, 7, 9, 11; one step drops 10 - 6 = 4 A tokens.
    features = torch.zeros(12, 8)
    features[0, 6] = features[1, 7] = 1.0
    for token, dim in zip((3, 5, 7, 9, 11), range(5)):
        features[token, dim] = 1.0  # B: five distinct directions
    for token, dim in zip((2, 4, 6, 8), range(4)):
        features[token, dim] = 2.0  # A: duplicates of 3, 5, 7, 9 (cosine 1)
    features[10, 5] = 1.0  # the one A token that duplicates nothing
    attention = torch.linspace(1.0, 0.1, 12)
    chosen = important_and_diverse(features[None], attention[None], budget=8, important_ratio=0.25)[0]
    assert chosen.tolist() == [0, 1, 10, 3, 5, 7, 9, 11]


def test_vispruner_all_important_is_top_attention():
    attention = torch.rand(3, 40, generator=torch.Generator().manual_seed(1))
    chosen = important_and_diverse(torch.randn(3, 40, 6), attention, budget=10, important_ratio=1.0)
    assert torch.equal(chosen, attention.topk(10).indices)


@pytest.mark.parametrize("budget,ratio", [(8, 0.5), (5, 0.4), (7, 0.0), (3, 0.5), (29, 0.5), (40, 0.5)])
def test_vispruner_keeps_exactly_the_budget_even_where_the_authors_code_fails(budget, ratio):
    # small diverse shares (r above the A half) and odd residual counts: the authors' indexing raises on these
    generator = torch.Generator().manual_seed(0)
    features, attention = torch.randn(2, 40, 6, generator=generator), torch.rand(2, 40, generator=generator)
    chosen = important_and_diverse(features, attention, budget, ratio)
    assert chosen.shape == (2, budget)
    assert all(row.unique().numel() == budget for row in chosen)
    important = int(budget * ratio)
    assert torch.equal(chosen[:, :important], attention.topk(important).indices)


def test_vispruner_batched_selection_equals_one_view_at_a_time():
    generator = torch.Generator().manual_seed(2)
    features, attention = torch.randn(4, 64, 8, generator=generator), torch.rand(4, 64, generator=generator)
    batched = important_and_diverse(features, attention, 20, 0.5)
    for g in range(4):
        assert torch.equal(batched[g], important_and_diverse(features[g : g + 1], attention[g : g + 1], 20, 0.5)[0])


def test_vispruner_selects_on_a_hand_made_context():
    generator = torch.Generator().manual_seed(3)
    features, attention = torch.randn(30, 5, generator=generator), torch.rand(1, 30, generator=generator)
    stage = Stage(layer=None, vision_layers=(22,), encoder_features=True)
    ctx = _single_item_context(30, 12, stage, encoder_features=features, cls_attention=attention)
    expected = important_and_diverse(features[None], attention, 12, 0.75)[0]
    assert torch.equal(VisPruner(important_ratio=0.75).select(ctx)[0], expected)


def test_vispruner_stage_options_and_refusal():
    assert VisPruner().stages(LLAVA, 64) == [
        Stage(layer=None, per_crop=True, vision_layers=(22,), encoder_features=True)  # attentions[-2] of 24 layers
    ]
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"vispruner: important_ratio must be a number in \[0, 1\]"):
            VisPruner(important_ratio=bad)
    with pytest.raises(ValueError, match=r"vispruner ranks tokens by the vision tower's \[CLS\] attention.*no \[CLS\]"):
        VisPruner().stages(QWEN, 64)


def _authors_loop(features, attention, budget, ratio):
    """The authors' encode_images for one image, written as a plain loop over Python lists."""
    important_count = int(budget * ratio)
    diverse = budget - important_count
    order = sorted(range(len(attention)), key=lambda t: -float(attention[t]))
    important, residual = order[:important_count], order[important_count:]
    normed = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        step = min(8, len(residual) - diverse)
        if step <= 0:
            break
        a, b = residual[::2], residual[1::2]
        score = [max(float(normed[i] @ normed[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda i: -score[i])
        residual = [a[i] for i in ranked[step:]] + b
    return sorted(important + (residual if diverse > 0 else []))


def test_vispruner_matches_the_authors_loop_on_llava():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])  # three images
    keep, ratio = 16, 0.5  # 8 important + 8 diverse out of 64: six steps of 8
    with vtprune.wrap(model, "vispruner", keep=keep, important_ratio=ratio) as pruning:
        model(**batch)
    cls = _tower_cls_attention(model, batch["pixel_values"])[1][:, 1:]  # attentions[-2] of 3 layers, patches
    features = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    kept = pruning.last.stages[0].kept_per_item
    assert len(kept) == 3
    for image in range(3):
        assert kept[image].tolist() == _authors_loop(features[image], cls[image], keep, ratio)


def test_vispruner_keep_all_is_the_dense_model():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    dense = model(**batch).logits
    with vtprune.wrap(model, "vispruner", keep=1.0):
        assert_close(model(**batch).logits, dense)


def test_vispruner_budget_is_per_view_on_llava_next():
    model = tiny_model("llava_next")
    batch = make_batch(model, samples_for("llava_next")[:1])
    with vtprune.wrap(model, "vispruner", keep=6) as pruning:
        model(**batch)
    budgets = pruning.last.stages[0].budgets
    assert budgets[0] > 6 and budgets[0] % 6 == 0  # 6 per view (base + crops)


@pytest.mark.parametrize("family", FAMILIES)
def test_vispruner_runs_where_a_cls_token_exists_and_refuses_elsewhere(family):
    model = tiny_model(family)
    if inapplicable(family, "vispruner", {}):
        with pytest.raises(ValueError, match=r"vispruner ranks tokens by the vision tower's \[CLS\] attention"):
            vtprune.wrap(model, "vispruner", keep=4)
        return
    assert family in ("llava", "llava_next")
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "vispruner", keep=4) as pruning:
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert pruning.last.seq_lens[0] < batch["input_ids"].shape[1]  # fewer tokens enter the LLM
