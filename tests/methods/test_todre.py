"""ToDRE: greedy max-sum / k-center diversity before the LLM, then cross-modal relevance at a late layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.todre  # registers "todre" (not in vtprune/methods/__init__)
from tests.helpers import FAMILIES, make_batch, samples_for, tiny_model
from tests.methods.common import LLAVA, _context
from vtprune.core.registry import ModelInfo, Stage
from vtprune.methods.todre import ToDRE, diverse_subset, max_sum_diverse
from vtprune.testing import IMAGE_TOKEN


# -- stage 1: diversity ----------------------------------------------------------------------------------------------
def _points(angles: list[float], lengths: list[float]) -> torch.Tensor:
    radians = [math.radians(a) for a in angles]
    return torch.tensor([[r * math.cos(a), r * math.sin(a)] for a, r in zip(radians, lengths)])


def test_kcenter_and_maxsum_pick_the_hand_computed_points():
    """Five 2-D points at 0, 60, 80, 200 and 220 degrees (lengths differ: cosine distance ignores them).

    d = 1 - cos(angle between): d(0,60)=.500, d(0,80)=.826, d(0,200)=1.940, d(0,220)=1.766, d(60,80)=.060,
    d(60,200)=1.766, d(60,220)=1.940, d(80,200)=1.500, d(80,220)=1.766, d(200,220)=.060.

    max-sum: summed distances to all: 5.03, 4.27, 4.15, 5.27, 5.53 -> 220; distance to {220}: 1.77, 1.94, 1.77, .06
    -> 60; summed distance to {220, 60}: 0 -> 2.27, 80 -> 1.83, 200 -> 1.83 -> 0.
    k-center: nearest-neighbour distances .500, .060, .060, .060, .060 -> 0; distance to {0}: .50, .83, 1.94, 1.77
    -> 200; distance to the nearest of {0, 200}: 60 -> .50, 80 -> .83, 220 -> .06 -> 80.
    """
    x = _points([0, 60, 80, 200, 220], [1.0, 2.0, 0.5, 3.0, 1.5])
    assert max_sum_diverse(x, 3).tolist() == [4, 1, 0]
    assert diverse_subset(x, 3, "maxsum").tolist() == [4, 1, 0]
    assert diverse_subset(x, 3, "kcenter").tolist() == [0, 3, 2]
    assert diverse_subset(x, 9, "maxsum").numel() == 5  # a budget above the token count keeps them all


def _plain_max_sum(x: torch.Tensor, k: int) -> list[int]:
    normed = x / x.norm(dim=-1, keepdim=True)
    distance = (1 - normed @ normed.T).tolist()
    n = len(distance)
    chosen = [max(range(n), key=lambda j: sum(distance[j]))]
    while len(chosen) < k:
        chosen.append(max((j for j in range(n) if j not in chosen), key=lambda j: sum(distance[s][j] for s in chosen)))
    return chosen


def _plain_k_center(x: torch.Tensor, k: int) -> list[int]:
    normed = x / x.norm(dim=-1, keepdim=True)
    distance = (1 - normed @ normed.T).tolist()
    n = len(distance)
    nearest = [min(distance[j][i] for i in range(n) if i != j) for j in range(n)]
    chosen = [max(range(n), key=lambda j: nearest[j])]
    while len(chosen) < k:
        chosen.append(max((j for j in range(n) if j not in chosen), key=lambda j: min(distance[s][j] for s in chosen)))
    return chosen


def test_max_sum_matches_a_plain_loop_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(12, 6, generator=generator)
        k = int(torch.randint(1, 13, (1,), generator=generator))
        assert max_sum_diverse(x, k).tolist() == _plain_max_sum(x, k)


def test_pre_llm_stage_selects_among_selectable_tokens_in_original_numbering():
    ctx = _context([5], [3], Stage(layer=None, scale=2.0))
    view = ctx.items[0]
    view.features = _points([0, 60, 80, 200, 220], [1.0] * 5)
    view.selectable = torch.tensor([True, True, True, True, False])  # 220 degrees is structural (e.g. a newline)
    # max-sum without 220: summed distances 0 -> 3.27, 60 -> 2.33, 80 -> 2.39, 200 -> 5.21, so 200; then 0 (1.94
    # from 200); then 80 (1.50 + .83 against 60's 1.77 + .50)
    assert ToDRE().select(ctx)[0].tolist() == [3, 0, 2]
    # k-center without 220: 200 is now the most isolated (nearest neighbour 1.50); then 0 (1.94); then 80 (.83 > .50)
    assert ToDRE(variant="kcenter").select(ctx)[0].tolist() == [3, 0, 2]


# -- stage 2: task relevance -----------------------------------------------------------------------------------------
def test_late_stage_keeps_the_tokens_with_the_highest_recomputed_attention():
    attention = torch.tensor([0.01, 0.30, 0.02, 0.25, 0.05, 0.20, 0.07, 0.10])
    ctx = _context([4, 4], [2, 1], Stage(layer=2, attention_from=2), attention)
    chosen = ToDRE().select(ctx)
    assert sorted(chosen[0].tolist()) == [1, 3]  # 0.30 and 0.25 in the first image
    assert chosen[1].tolist() == [1]  # 0.20 is the highest of the second image


# -- options and stages ----------------------------------------------------------------------------------------------
def test_defaults_prune_before_the_llm_and_at_layer_16_of_32():
    stages = ToDRE().stages(LLAVA, 58)
    assert stages == [Stage(layer=None, scale=2.0), Stage(layer=16, attention_from=16, query="last")]
    assert ToDRE().stages(ModelInfo("qwen_vl", 28, False, True), 8)[1].layer == 14  # scaled: 16 * 28 / 32
    custom = ToDRE(layer=5, query="instruction", stage1_scale=4).stages(LLAVA, 8)
    assert custom == [Stage(layer=None, scale=4.0), Stage(layer=5, attention_from=5, query="instruction")]


def test_linear_attention_layers_read_the_last_softmax_layer_before_them():
    types = ("linear_attention", "linear_attention", "full_attention", "linear_attention", "linear_attention")
    model = ModelInfo("qwen3_5", 5, False, True, layer_types=types)
    assert ToDRE(layer=4).stages(model, 8)[1] == Stage(layer=4, attention_from=2, query="last")
    with pytest.raises(ValueError, match=r"todre: layer=1 has no softmax-attention layer .* layer must be at least 2"):
        ToDRE(layer=1).stages(model, 8)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "dpp"}, "todre: variant must be 'maxsum'"),
        ({"query": "all"}, r"todre: query must be one of \('last', 'instruction'\)"),
        ({"stage1_scale": 0.5}, "todre: stage1_scale .* must be a finite number >= 1"),
        ({"stage1_scale": True}, "todre: stage1_scale"),
        ({"positions": "shift"}, "positions must be one of"),
        ({"drop_all": 1}, "todre: drop_all must be True or False"),
    ],
)
def test_bad_options_name_the_parameter_and_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        ToDRE(**options)


def test_a_layer_outside_the_model_is_refused():
    with pytest.raises(ValueError, match=r"todre: layer=40 is outside the model"):
        ToDRE(layer=40).stages(LLAVA, 8)
    with pytest.raises(ValueError, match=r"todre: layer=0 is outside the model"):
        ToDRE(layer=0).stages(LLAVA, 8)


# -- on a model ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["maxsum", "kcenter"])
def test_matches_a_plain_reference_on_llava(variant):
    """Reference from the spec: stage 1 by the plain greedy loop on the projected features; stage 2 on the shortened
    prompt (kept image tokens only, positions renumbered) by eager attention of layer 2 from its own input, the last
    token's row averaged over heads, top-k per image."""
    model = tiny_model("llava")  # SDPA on our side
    reference = tiny_model("llava", attn_implementation="eager")
    batch = make_batch(model, samples_for("llava")[:2])
    keep, scale, layer = 3, 2, 2
    with vtprune.wrap(model, "todre", keep=keep, variant=variant) as pruning:
        model(**batch)
    first, second = pruning.last.stages
    features = reference.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    plain = _plain_max_sum if variant == "maxsum" else _plain_k_center
    diverse = [sorted(plain(image, keep * scale)) for image in features]
    assert [k.tolist() for k in first.kept_per_item] == diverse

    image = 0
    for b in range(2):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        embeds = reference.get_input_embeddings()(ids)
        placeholders = (ids == IMAGE_TOKEN).nonzero().squeeze(1).split(64)
        drop = torch.zeros(ids.numel(), dtype=torch.bool)
        kept_slots = []
        for slots in placeholders:
            kept = torch.tensor(diverse[image + len(kept_slots)])
            embeds[slots[kept]] = features[image + len(kept_slots)][kept]
            drop[slots] = True
            drop[slots[kept]] = False
            kept_slots.append(slots[kept])
        short = (~drop).nonzero().squeeze(1)
        out = reference.model.language_model(
            inputs_embeds=embeds[short][None], position_ids=torch.arange(short.numel())[None], output_attentions=True
        )
        row = out.attentions[layer][0].mean(0)[-1]  # layer 2's attention from its own input, last token, head mean
        for slots in kept_slots:
            columns = torch.searchsorted(short, slots)  # where the kept image tokens sit in the shortened prompt
            top = row[columns].topk(keep).indices
            expected = torch.tensor(diverse[image])[top].sort().values
            assert torch.equal(second.kept_per_item[image], expected)
            image += 1
    assert image == len(features)


# one family per kind of layout: fixed grid, any-res views with newlines, M-RoPE grid, linear attention, sliding window
DENSE_FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_5", "gemma3")


@pytest.mark.parametrize("family", [f for f in DENSE_FAMILIES if f in FAMILIES])
def test_keep_all_equals_dense(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, "todre", keep=1.0):
        assert_close(model(**batch).logits, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "todre", keep=3) as pruning:
        model(**batch)
        first, second = pruning.last.stages
        assert (first.layer, second.layer) == (None, 2)
        # stage 1 keeps twice the final budget (capped at an item's tokens), stage 2 the budget, among stage 1's
        assert all(0 < b2 <= min(3, b1) and b1 <= 6 for b1, b2 in zip(first.budgets, second.budgets))
        assert any(b1 == 6 for b1 in first.budgets)
        assert all(bool(torch.isin(k2, k1).all()) for k1, k2 in zip(first.kept_per_item, second.kept_per_item))
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
    with pytest.raises(ValueError, match="todre: layer=9 is outside the model"):
        vtprune.wrap(model, "todre", keep=3, layer=9)


@pytest.mark.parametrize("family", [f for f in ("llava", "qwen2_5_vl") if f in FAMILIES])
def test_drop_all_removes_every_visual_token_at_the_late_layer(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "todre", keep=3, drop_all=True) as pruning:
        model(**batch)
        first, second = pruning.last.stages
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert all(b == 3 for b in first.budgets) and all(b == 0 for b in second.budgets)
    assert all(k.numel() == 0 for k in second.kept_per_item)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
    assert ToDRE(drop_all=True).stages(LLAVA, 58) == [Stage(layer=None), Stage(layer=16, scale=0.0)]
