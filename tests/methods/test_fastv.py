"""FastV: top-k by the attention visual tokens receive, against eager attention maps."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import (
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import INFO, _context
from vtprune.core.registry import Stage


def test_fastv_keeps_the_tokens_the_last_token_attends_to_most():
    attention = torch.tensor([0.01, 0.30, 0.02, 0.25, 0.05, 0.20, 0.07, 0.10])
    ctx = _context([4, 4], [2, 1], Stage(layer=2, attention_from=1), attention)
    chosen = vtprune.FastV().select(ctx)
    assert sorted(chosen[0].tolist()) == [1, 3]  # 0.30 and 0.25 in the first image
    assert chosen[1].tolist() == [1]  # 0.20 is the highest of the second image


def test_fastv_prunes_at_layer_k_with_attention_of_layer_k_minus_1():
    stages = vtprune.FastV(layer=3).stages(INFO, 64)
    assert stages == [Stage(layer=3, attention_from=2, query="last")]


def test_fastv_matches_a_reference_built_from_eager_attention_maps():
    """Reference from the spec: eager attention of layer K-1, head mean, last token's row, top-k per image."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    keep, layer = 5, 2
    attention = model(**batch, output_attentions=True).attentions[layer - 1].mean(1)
    with vtprune.wrap(model, "fastv", keep=keep, layer=layer) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    for sample in range(2):
        row = attention[sample, -1][visual[sample]]  # left padding: the last token is the last slot
        per_image = row.split(64)
        expected = torch.cat([img.topk(keep).indices.sort().values + 64 * i for i, img in enumerate(per_image)])
        assert torch.equal(pruning.kept[0][sample], expected)


def test_fastv_all_tokens_rule_matches_the_eager_attention_average():
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    attention = model(**batch, output_attentions=True).attentions[1].mean(1)  # [B, L, L]
    with vtprune.wrap(model, "fastv", keep=5, query="all") as pruning:
        model(**batch)
    mask = batch["attention_mask"].bool()
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        received = attention[b][mask[b]].mean(0)[visual[b]]  # averaged over every real query token
        for image in received.split(64):
            assert torch.equal(next(kept), image.topk(5).indices.sort().values)
