"""PyramidDrop: the authors' schedule and a reference from eager attention."""

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
from tests.methods.common import LLAVA
from vtprune.core.budget import stage_budgets


def test_pdrop_schedule_halves_after_layers_8_16_24():
    stages = vtprune.PyramidDrop().stages(LLAVA, 72)
    assert [s.layer for s in stages] == [8, 16, 24]
    assert all(s.attention_from == s.layer and s.query == "last" for s in stages)
    assert stage_budgets(72, 576, [(s.layer, s.scale) for s in stages], 32) == [288, 144, 72]
    # the authors' average accounting: (576*8 + 288*8 + 144*8 + 72*8) / 32 = 270
    assert stage_budgets(270, 576, [(s.layer, s.scale) for s in stages], 32, "average") == [288, 144, 72]


def test_pdrop_matches_a_reference_from_eager_attention():
    """One stage after layer 2 (1-based): the last token's attention in layer index 2, head-averaged."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    attention = model(**batch, output_attentions=True).attentions[2].mean(1)
    with vtprune.wrap(model, "pdrop", keep=5, layers=(2,)) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        row = attention[b, -1][visual[b]]  # left padding: the last token is the last slot
        for image in row.split(64):
            assert torch.equal(next(kept), image.topk(5).indices.sort().values)
