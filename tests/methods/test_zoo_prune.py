"""ZOO-Prune: the zeroth-order sensitivity on hand-made projectors, the sensitivity-weighted greedy by hand, a plain
loop reference on LLaVA-1.5, keep=all, and every family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.zoo_prune  # registers "zoo_prune" (not yet imported by vtprune.methods)
from tests.helpers import FAMILIES, inapplicable, make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA, QWEN, _single_item_context
from vtprune.core.registry import Stage
from vtprune.methods.divprune import max_min_diverse
from vtprune.methods.zoo_prune import ZooPrune, random_directions, sensitive_diverse, zeroth_order_sensitivity

APPLIES = ("llava", "llava_next", "llava_onevision")  # per-token MLP projectors
STAGE = Stage(layer=None, per_crop=True, encoder_features=True)


def test_directions_are_seeded_unit_gaussians():
    u = random_directions(64, 5, seed=3, device="cpu", dtype=torch.float32)
    assert u.shape == (64, 5)
    assert_close(u.norm(dim=-1), torch.ones(64))
    assert torch.equal(u, random_directions(64, 5, seed=3, device="cpu", dtype=torch.float32))
    assert not torch.equal(u, random_directions(64, 5, seed=4, device="cpu", dtype=torch.float32))
    raw = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    assert_close(u, raw / raw.norm(dim=-1, keepdim=True))  # N(0, I) scaled to unit length


def test_linear_projector_estimate_is_the_mean_norm_of_w_u():
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 0.0]])
    features = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    u = random_directions(16, 3, seed=0, device="cpu", dtype=torch.float32)
    sensitivity = zeroth_order_sensitivity(features, lambda x: x @ w.T, u, eps=0.01)
    expected = (u @ w.T).norm(dim=-1).mean()  # a linear map's Jacobian is W everywhere
    assert_close(sensitivity, expected.expand(7), rtol=1e-4, atol=1e-5)


def test_a_token_where_the_projector_amplifies_gets_the_higher_sensitivity():
    # P(x) = W relu(x), W = diag(10, 1): around (1, -1) the Jacobian is diag(10, 0), around (-1, 1) diag(0, 1)
    w = torch.diag(torch.tensor([10.0, 1.0]))
    features = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    u = random_directions(32, 2, seed=1, device="cpu", dtype=torch.float32)
    sensitivity = zeroth_order_sensitivity(features, lambda x: torch.relu(x) @ w.T, u, eps=0.01)
    expected = torch.stack([10 * u[:, 0].abs().mean(), u[:, 1].abs().mean(), (u @ w.T).norm(dim=-1).mean()])
    assert_close(sensitivity, expected, rtol=1e-4, atol=1e-5)
    assert sensitivity[0] > sensitivity[1]


def test_chunking_the_projector_passes_changes_nothing(monkeypatch):
    features = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 6))
    u = random_directions(10, 4, seed=0, device="cpu", dtype=torch.float32)
    whole = zeroth_order_sensitivity(features, layer, u, eps=0.01)
    monkeypatch.setattr(vtprune.methods.zoo_prune, "CHUNK_ROWS", 20)  # 2 directions per pass
    assert_close(zeroth_order_sensitivity(features, layer, u, eps=0.01), whole)


def test_the_hybrid_greedy_follows_the_hand_computed_order():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    sensitivity = torch.tensor([1.0, 3.0, 2.0, 0.5])  # weights 0.2, 1, 0.6, 0
    # 1st: the most sensitive (1). Distances to it: 0: 0.005, 2: 0.900, 3: 1.995, so scores 0.001, 0.540, 0 -> 2.
    # Then 0: min(0.005, 1) * 0.2 = 0.001 beats 3: 0 * anything -> 0, and 3 comes last.
    assert sensitive_diverse(features, sensitivity, 4).tolist() == [1, 2, 0, 3]
    assert max_min_diverse(features, 3).tolist()[:2] != [1, 2]  # diversity alone ranks otherwise
    # equal sensitivities weigh every token 1: the first index, then plain max-min distance
    assert sensitive_diverse(features, torch.ones(4), 3).tolist() == [0, 3, 2]
    assert sensitive_diverse(features, sensitivity, 0).tolist() == []
    assert sensitive_diverse(features, sensitivity, 9).tolist() == [1, 2, 0, 3]  # capped at the tokens there are


def _hand_context(seed_features: int, budget: int, **view_fields):
    generator = torch.Generator().manual_seed(seed_features)
    encoder, projected = torch.randn(12, 4, generator=generator), torch.randn(12, 6, generator=generator)
    ctx = _single_item_context(12, budget, STAGE, encoder_features=encoder, features=projected, **view_fields)
    w1, w2 = torch.randn(8, 4, generator=generator), torch.randn(6, 8, generator=generator)
    ctx.projector = lambda x: torch.tanh(x @ w1.T) @ w2.T
    return ctx, encoder, projected


def test_select_on_a_hand_made_context_scores_before_and_picks_after_the_projector():
    ctx, encoder, projected = _hand_context(0, 5)
    method = ZooPrune(directions=8, eps=0.001, seed=7)
    u = random_directions(8, 4, seed=7, device="cpu", dtype=torch.float32)
    sensitivity = zeroth_order_sensitivity(encoder, ctx.projector, u, eps=0.001)
    assert torch.equal(method.select(ctx)[0], sensitive_diverse(projected, sensitivity, 5))


def test_each_view_is_selected_on_its_own():
    groups = torch.tensor([0] * 5 + [1] * 7)
    ctx, encoder, projected = _hand_context(1, 5, groups=groups, group_budgets={0: 2, 1: 3})
    u = random_directions(64, 4, seed=0, device="cpu", dtype=torch.float32)
    sensitivity = zeroth_order_sensitivity(encoder, ctx.projector, u, eps=0.01)
    chosen = ZooPrune().select(ctx)[0]
    first, second = torch.arange(5), torch.arange(5, 12)
    expected = [first[sensitive_diverse(projected[first], sensitivity[first], 2)]]
    expected.append(second[sensitive_diverse(projected[second], sensitivity[second], 3)])
    assert chosen.tolist() == torch.cat(expected).tolist()


def test_same_seed_same_selection_other_seeds_may_differ():
    ctx, _, _ = _hand_context(2, 4)
    selections = {seed: ZooPrune(directions=2, seed=seed).select(ctx)[0].tolist() for seed in range(6)}
    assert ZooPrune(directions=2, seed=3).select(ctx)[0].tolist() == selections[3]
    assert len({tuple(s) for s in selections.values()}) > 1  # two directions: the estimate depends on them


def test_options_stages_and_refusals():
    assert ZooPrune().stages(LLAVA, 64) == [STAGE]
    assert (ZooPrune().directions, ZooPrune().eps) == (64, 0.01)  # the authors' run_zoo_prune.sh
    for field, bad, message in [
        ("directions", 0, "directions must be a positive int"),
        ("directions", 2.0, "directions must be a positive int"),
        ("eps", 0.0, "eps must be a finite number > 0"),
        ("eps", float("nan"), "eps must be a finite number > 0"),
        ("seed", -1, r"seed must be an int in \[0, 2\*\*63\)"),
        ("seed", True, r"seed must be an int in \[0, 2\*\*63\)"),
    ]:
        with pytest.raises(ValueError, match=f"zoo_prune: {message}"):
            ZooPrune(**{field: bad})
    from dataclasses import replace

    with pytest.raises(ValueError, match="zoo_prune perturbs each visual token's own input to the projector, but "):
        ZooPrune().stages(replace(QWEN, per_token_projector=False), 64)


def test_missing_pre_projector_features_or_projector_raise_clearly():
    ctx, _, _ = _hand_context(0, 5)
    ctx.items[0].encoder_features = None
    with pytest.raises(ValueError, match="zoo_prune: image 0 has no per-token features before the projector"):
        ZooPrune().select(ctx)
    ctx, _, _ = _hand_context(0, 5)
    ctx.projector = None
    with pytest.raises(RuntimeError, match="no per-token projector at this stage"):
        ZooPrune().select(ctx)


def _reference(pre: torch.Tensor, projected: torch.Tensor, project, k: int, eps: float, seed: int, keep: int):
    """The spec as plain loops over one image: K seeded unit Gaussian directions, one projector call per token and
    direction and sign, then the greedy with min-max normalised sensitivity x min cosine distance."""
    n, dim = pre.shape
    raw = torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))
    directions = [raw[j] / raw[j].norm() for j in range(k)]
    sensitivity = []
    for i in range(n):
        total = 0.0
        for u in directions:
            total += float((project(pre[i] + eps * u) - project(pre[i] - eps * u)).norm()) / (2 * eps)
        sensitivity.append(total / k)
    low, high = min(sensitivity), max(sensitivity)
    weight = [(s - low) / (high - low + 1e-8) for s in sensitivity]
    normed = projected / projected.norm(dim=-1, keepdim=True)
    distance = 1 - normed @ normed.T
    chosen = [max(range(n), key=lambda j: (weight[j], -j))]
    while len(chosen) < keep:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (weight[j] * min(float(distance[s, j]) for s in chosen), -j)))
    return sorted(chosen)


def test_matches_a_plain_loop_reference_on_llava():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])  # three images
    keep, k, eps, seed = 6, 4, 0.01, 5
    with vtprune.wrap(model, "zoo_prune", keep=keep, directions=k, eps=eps, seed=seed) as pruning:
        model(**batch)
    tower = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    pre = tower.hidden_states[model.config.vision_feature_layer][:, 1:]  # LLaVA drops [CLS]
    projected = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    kept = pruning.last.stages[0].kept_per_item
    assert len(kept) == 3
    with torch.no_grad():
        for image in range(3):
            expected = _reference(pre[image], projected[image], model.model.multi_modal_projector, k, eps, seed, keep)
            assert kept[image].tolist() == expected


def test_paligemma_is_refused_because_its_linear_projector_makes_every_sensitivity_equal():
    model = tiny_model("paligemma")
    batch = make_batch(model, samples_for("paligemma")[:1])
    pre = model.model.vision_tower(batch["pixel_values"]).last_hidden_state[0]
    u = random_directions(64, pre.shape[-1], seed=0, device="cpu", dtype=pre.dtype)
    sensitivity = zeroth_order_sensitivity(pre, model.model.multi_modal_projector, u, eps=0.01)
    assert float(sensitivity.max() - sensitivity.min()) < 1e-3 * float(sensitivity.mean())  # rounding noise only
    with pytest.raises(ValueError, match="zoo_prune: PaliGemma.* projector is one linear layer.*use divprune"):
        vtprune.wrap(model, "zoo_prune", keep=4)


@pytest.mark.parametrize("family", APPLIES)
def test_keep_all_is_the_dense_model(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    dense = model(**batch).logits
    with vtprune.wrap(model, "zoo_prune", keep=1.0):
        assert_close(model(**batch).logits, dense)


def test_budget_is_per_view_on_llava_next():
    model = tiny_model("llava_next")
    batch = make_batch(model, samples_for("llava_next")[:1])
    with vtprune.wrap(model, "zoo_prune", keep=6) as pruning:
        model(**batch)
    budgets = pruning.last.stages[0].budgets
    assert budgets[0] > 6 and budgets[0] % 6 == 0  # 6 per view (base + crops)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_where_the_projector_is_per_token_and_refuses_elsewhere(family):
    model = tiny_model(family)
    if inapplicable(family, "zoo_prune", {}):
        assert family not in APPLIES
        with pytest.raises(ValueError, match=r"zoo_prune(:| perturbs each visual token's own input to) .*projector"):
            vtprune.wrap(model, "zoo_prune", keep=4)
        return
    assert family in APPLIES
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "zoo_prune", keep=4) as pruning:
        model(**batch)
        stage = pruning.last.stages[0]
        assert stage.layer is None and all(len(k) for k in stage.kept_per_item)
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 2
    assert pruning.last.seq_lens[0] < batch["input_ids"].shape[1]  # fewer tokens enter the LLM
