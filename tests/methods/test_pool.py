"""Pooling: grid cells like avg_pool2d, after the projector and before it in CLIP space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model
from tests.helpers import pooled as encoder_output
from vtprune.methods.pool import cell_of


def test_cells_partition_the_grid_like_avg_pool():
    cells = cell_of(24, 24, 8, 8).view(24, 24)
    assert cells[0:3, 0:3].unique().tolist() == [0] and cells[21:, 21:].unique().tolist() == [63]
    assert torch.bincount(cells.flatten()).tolist() == [9] * 64


def test_pool_after_the_projector_is_avg_pool2d():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "pool", keep=16) as pruning:
        pruned = model(**batch).logits
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    pooled = [F.avg_pool2d(f.T.reshape(1, -1, 8, 8), 2).flatten(2)[0].T for f in features]  # 8x8 -> 4x4
    corners = torch.tensor([r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)])
    assert all(torch.equal(kept, corners) for kept in pruning.last.stages[0].kept_per_item)
    # the born-short prompt carrying the pooled features gives the same logits
    index = pruning.last.output_index
    short_ids = batch["input_ids"].gather(1, index.clamp(min=0)).masked_fill(index < 0, 0)
    born_short = model(
        input_ids=short_ids, attention_mask=(index >= 0).long(), mm_encoder_outputs={"image": encoder_output(pooled)}
    ).logits
    assert_close(pruned[index >= 0], born_short[index >= 0], rtol=1e-4, atol=1e-5)


def test_pool_before_the_projector_projects_the_clip_means():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    out = model.model.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
    clip = out.hidden_states[-2][0, 1:]
    means = F.avg_pool2d(clip.T.reshape(1, -1, 8, 8), 4).flatten(2)[0].T  # 8x8 -> 2x2, in CLIP space
    expected = model.model.multi_modal_projector(means)
    with vtprune.wrap(model, "pool", keep=4, where="before") as pruning:
        logits = model(**batch).logits
    index = pruning.last.output_index
    short_ids = batch["input_ids"].gather(1, index)
    born_short = model(input_ids=short_ids, mm_encoder_outputs={"image": encoder_output([expected])}).logits
    assert_close(logits, born_short, rtol=1e-4, atol=1e-5)
