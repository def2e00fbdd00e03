"""DART: least-duplicated tokens w.r.t. key-norm pivots, against a plain-loop reference from the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
import vtprune.methods.dart  # registers "dart" (not yet imported by vtprune.methods)
from tests.helpers import (
    FAMILIES,
    Image,
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import LLAVA, QWEN
from vtprune.core.registry import ModelInfo, Stage
from vtprune.methods.dart import DART, least_duplicated

# unit directions at known angles: 0 is the pivot, 1 its near-duplicate, 3 its opposite
DIRECTIONS = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.1, 0.99]])
KEY_NORMS = torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # token 0 has the largest key norm


def test_dart_keeps_the_tokens_least_similar_to_the_pivot():
    chosen = least_duplicated(DIRECTIONS, KEY_NORMS, torch.empty(0, 2), budget=3, pivot_image=1)
    # the pivot, then its least similar tokens: the opposite one (cos -1), then the orthogonal one (cos 0 < 0.1)
    assert chosen.tolist() == [0, 3, 2]


def test_dart_text_pivots_take_their_share_but_are_not_kept():
    text = torch.tensor([[0.0, 1.0]])  # a text pivot pointing like token 2
    chosen = least_duplicated(DIRECTIONS, KEY_NORMS, text, budget=4, pivot_image=1)
    # 3 non-pivot tokens over 2 pivots: the image pivot takes 2 (3, 2), the text pivot 1 of what is left (1: cos 0.1)
    assert chosen.tolist() == [0, 3, 2, 1]


def test_dart_keeps_exactly_the_budget_and_everything_at_full_budget():
    generator = torch.Generator().manual_seed(0)
    states, norms = torch.randn(20, 8, generator=generator), torch.rand(20, generator=generator)
    text = torch.randn(4, 8, generator=generator)
    for budget in (1, 3, 4, 5, 9, 13, 20, 30):
        chosen = least_duplicated(states, norms, text, budget, pivot_image=4)
        assert chosen.numel() == min(budget, 20) and chosen.unique().numel() == chosen.numel()
        assert set(norms.topk(min(budget, 4)).indices.tolist()) <= set(chosen.tolist())  # image pivots stay


def test_dart_defaults_and_layers():
    assert DART().stages(LLAVA, 64) == [Stage(layer=2, states_from=1)]
    assert DART(layer=5).stages(QWEN, 64) == [Stage(layer=5, states_from=4)]  # LightCompress's pruning_loc
    # Qwen3.5-shaped: three linear-attention layers, then softmax attention every fourth layer
    hybrid = ModelInfo(
        family="qwen3_5", num_layers=8, has_cls_token=False, mrope=True,
        layer_types=("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",),
    )
    assert DART(layer=6).stages(hybrid, 64) == [Stage(layer=6, states_from=3)]  # the last KV cache before 6
    with pytest.raises(ValueError, match=r"dart: layer=2 has no softmax-attention layer .*layer must be at least 4"):
        DART().stages(hybrid, 64)
    with pytest.raises(ValueError, match=r"layer=0 is outside"):
        DART(layer=0).stages(LLAVA, 64)
    with pytest.raises(ValueError, match=r"dart: pivot_image must be an int >= 1, got 0"):
        DART(pivot_image=0)
    with pytest.raises(ValueError, match=r"dart: pivot_text must be an int >= 0, got -1"):
        DART(pivot_text=-1)


def _runs(mask: torch.Tensor) -> list[list[int]]:
    """Positions of each contiguous run of True (one image each in these prompts)."""
    runs, current = [], []
    for position, flag in enumerate(mask.tolist()):
        if flag:
            current.append(position)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _dart_reference(keys, normed, image, text, budget, pivot_image=4, pivot_text=4):
    """The spec's loop for one image (prompt positions), with our budget split and pivot order."""
    l1 = keys.abs().sum(-1)
    image_pivots = sorted(image, key=lambda p: -float(l1[p]))[: min(pivot_image, budget)]
    text_pivots = sorted(text, key=lambda p: -float(l1[p]))[:pivot_text]
    pivots, kept = image_pivots + text_pivots, list(image_pivots)
    valid = [p for p in image if p not in image_pivots]
    remaining = budget - len(image_pivots)
    for j, pivot in enumerate(pivots):
        quota = remaining // len(pivots) + (1 if j < remaining % len(pivots) else 0)
        sims = F.cosine_similarity(normed[pivot][None], normed[valid], dim=-1).tolist()
        picked = [valid[i] for i in sorted(range(len(valid)), key=lambda i: sims[i])[:quota]]
        kept += picked
        valid = [p for p in valid if p not in picked]
    return sorted(kept)


# 1-D RoPE; M-RoPE; q/k norms with sliding layers; interleaved RoPE pairs (GLM-4V, where the family exists)
@pytest.mark.parametrize("family", [f for f in ("llava", "qwen2_5_vl", "gemma3", "glm4v") if f in FAMILIES])
def test_dart_matches_a_reference_from_the_kv_cache(family):
    """Pivots from the dense model's KV cache of layer K-1 (post-RoPE keys), similarities after its final norm."""
    model = tiny_model(family)
    final_norm = model.model.language_model.norm
    with torch.no_grad():  # random models start with a uniform norm weight, under which cosines ignore the norm
        final_norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    samples = [[4, Image((16, 16)), 6], [2, Image((24, 16)), 3, Image((16, 16)), 5]]
    batch = with_positions(model, make_batch(model, samples))
    keep, layer = 9, 2
    out = model(**batch, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values.layers[layer - 1].keys  # [B, kv_heads, L, head_dim], after RoPE
    keys = cache.permute(0, 2, 1, 3).flatten(2)
    normed = final_norm(out.hidden_states[layer])  # the input of layer K, final norm
    with vtprune.wrap(model, "dart", keep=keep, layer=layer) as pruning:
        model(**batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    real, visual = batch["attention_mask"].bool(), visual_mask(batch)
    for b in range(len(samples)):
        images = _runs(visual[b])
        text = [p for p in range(images[-1][-1] + 1, real.shape[1]) if real[b, p]]
        for image in images:
            expected = _dart_reference(keys[b], normed[b], image, text, min(keep, len(image)))
            assert next(kept).tolist() == [image.index(p) for p in expected]


def test_dart_keep_all_is_the_dense_model():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    dense = model(**batch).logits
    with vtprune.wrap(model, "dart", keep=1.0) as pruning:
        assert_close(model(**batch).logits, dense)
    assert all(k.numel() == 64 for k in pruning.last.stages[0].kept_per_item)


def test_dart_without_instruction_text_shares_the_budget_among_image_pivots():
    model = tiny_model("llava")
    batch = make_batch(model, [[4, Image()]])  # the image ends the prompt: no text pivots
    with vtprune.wrap(model, "dart", keep=10) as pruning:
        model(**batch)
    assert pruning.last.stages[0].kept_per_item[0].numel() == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_dart_runs_on_every_family(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "dart", keep=4) as pruning:
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    record = pruning.last
    assert record.stages[0].layer == 2 and all(b <= 4 for b in record.stages[0].budgets)
    assert record.seq_lens[2] < record.seq_lens[1]  # layer 2 on sees fewer tokens
