"""EntropyPrune: query-matrix entropy, defaults and average budget, against a covariance reference."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import LLAVA, QWEN
from vtprune.core.budget import stage_budgets
from vtprune.core.registry import Stage
from vtprune.methods.entropyprune import token_matrix_entropy


def test_dual_gram_entropy_equals_the_covariance_spectrum_entropy():
    torch.manual_seed(0)
    queries = torch.randn(5, 32, 128)  # 5 tokens, 32 heads x 128 dims, as LLaVA-1.5-7B
    centred = queries.double() - queries.double().mean(dim=-2, keepdim=True)
    covariance = centred.transpose(-1, -2) @ centred / 32  # [128, 128]
    eigenvalues = torch.linalg.eigvalsh(covariance).clamp_min(1e-10)
    top = eigenvalues.sort(descending=True).values[..., :32]  # the 32 non-zero ones (rank <= heads)
    expected = -(top * top.log()).sum(-1) / math.log(32)
    assert_close(token_matrix_entropy(queries), expected, rtol=1e-6, atol=1e-6)


def test_entropy_is_highest_for_spread_out_queries():
    flat = torch.zeros(1, 8, 16)
    flat[0, :, 0] = 1.0  # every head identical: no variance, minimal entropy
    spread = torch.eye(16)[None, :8] * 0.5  # heads orthogonal: a flat spectrum of 7 eigenvalues 0.25 / 8
    entropy = token_matrix_entropy(torch.cat([flat, spread]))
    assert entropy[0] < 1e-6
    assert_close(entropy[1], torch.tensor(-7 * (0.25 / 8) * math.log(0.25 / 8) / math.log(8), dtype=torch.float64))


def test_entropyprune_defaults_and_average_budget():
    assert vtprune.EntropyPrune().stages(LLAVA, 64) == [Stage(layer=2, states_from=1)]
    assert vtprune.EntropyPrune().stages(QWEN, 64) == [Stage(layer=1, states_from=0)]
    # the authors' save_num = int((L * avg - K * N) / (L - K)) on LLaVA-1.5-7B
    assert [stage_budgets(avg, 576, [(2, 1.0)], 32, "average")[0] for avg in (192, 128, 64)] == [166, 98, 29]


def test_entropyprune_average_budget_end_to_end():
    model = tiny_model("llava")  # 4 layers, 64 tokens per image
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "entropyprune", keep=40, budget="average") as pruning:
        model(**batch)
    assert pruning.last.stages[0].kept_per_item[0].numel() == (4 * 40 - 2 * 64) // 2
    assert pruning.config()["budget"] == "average" and pruning.last.budget == "average"


def _query_states_reference(model, batch, layer: int) -> torch.Tensor:
    """Layer `layer`'s query states after RoPE, recomputed from the dense model's hidden states, [B, L, H, d]."""
    lm = model.model.language_model
    hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
    decoder = lm.layers[layer]
    attn = decoder.self_attn
    q = attn.q_proj(decoder.input_layernorm(hidden)).view(*hidden.shape[:2], -1, attn.head_dim)
    positions = batch["position_ids"]
    cos, sin = lm.rotary_emb(hidden, positions)
    rotated = torch.cat([-q[..., attn.head_dim // 2 :], q[..., : attn.head_dim // 2]], -1)
    return q * cos[:, :, None] + rotated * sin[:, :, None]


def test_entropyprune_matches_a_covariance_reference():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    keep = 9
    with vtprune.wrap(model, "entropyprune", keep=keep) as pruning:
        model(**batch)
    queries = _query_states_reference(model, batch, layer=1).double()  # states of layer K - 1 = 1
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for sample in range(2):
        for image in queries[sample][visual[sample]].split(64):
            entropies = []
            for token in image:  # plain loop, through the head_dim x head_dim covariance
                centred = token - token.mean(0, keepdim=True)
                spectrum = torch.linalg.eigvalsh(centred.T @ centred / token.shape[0]).clamp_min(1e-10)
                spectrum = spectrum.sort(descending=True).values[: token.shape[0]]
                entropies.append(float(-(spectrum * spectrum.log()).sum() / math.log(token.shape[0])))
            expected = torch.tensor(entropies).topk(keep).indices.sort().values
            assert torch.equal(next(kept), expected)
