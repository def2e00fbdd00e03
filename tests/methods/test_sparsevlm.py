"""SparseVLM: schedule, recycling counts, density-peak clusters and a reference from eager attention."""

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


def test_sparsevlm_recycling_counts_follow_the_authors():
    from vtprune.methods.sparsevlm import recycled_clusters

    # 576 -> 300 at the first stage drops 276: top 30 % + 1 = 83 candidates, 83 // 10 + 1 = 9 clusters
    assert recycled_clusters(276) == 9
    assert recycled_clusters(0) == 0 and recycled_clusters(1) == 1


def test_density_peaks_find_separated_clusters():
    from vtprune.methods.sparsevlm import density_peak_clusters

    generator = torch.Generator().manual_seed(0)
    blobs = [torch.randn(6, 4, generator=generator) * 0.05 + centre for centre in (0.0, 5.0, -5.0)]
    centres, assignment = density_peak_clusters(torch.cat(blobs), 3)
    groups = [set(assignment[i * 6 : (i + 1) * 6].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3  # one cluster per blob
    assert sorted((centres // 6).tolist()) == [0, 1, 2]
    assert all(int(assignment[c]) == i for i, c in enumerate(centres.tolist()))


def test_sparsevlm_schedule_and_default_profile():
    stages = vtprune.SparseVLM().stages(LLAVA, 192)  # the profile of the authors' 192 budget
    assert [s.layer for s in stages] == [3, 7, 16] and [s.attention_from for s in stages] == [2, 6, 15]
    assert stage_budgets(110, 576, [(s.layer, s.scale) for s in stages], 32) == [300, 200, 110]
    # with the average accounting, keep=192 lands close to the authors' counts
    assert stage_budgets(192, 576, [(s.layer, s.scale) for s in stages], 32, "average") == [278, 185, 102]
    assert stage_budgets(17, 576, [(s.layer, s.scale) for s in vtprune.SparseVLM().stages(LLAVA, 64)], 32) == [
        66, 30, 17,
    ]  # fmt: skip


def test_sparsevlm_matches_a_reference_from_eager_attention():
    """One stage after layer 1 without recycling: raters from the input embeddings, their attention in layer 1."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    dense = model(**batch, output_attentions=True, output_hidden_states=True)
    attention = dense.attentions[1].mean(1)
    embeds = dense.hidden_states[0]
    with vtprune.wrap(model, "sparsevlm", keep=6, layers=(1,), recycle=False) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)
        text = list(range(int(positions.max()) + 1, batch["input_ids"].shape[1]))
        relevance = torch.softmax(embeds[b, positions] @ embeds[b, text].T, dim=1).mean(0)
        raters = [t for t, r in zip(text, relevance.tolist()) if r > float(relevance.mean())]
        score = attention[b, raters][:, positions].mean(0)
        for image in score.split(64):
            assert torch.equal(next(kept), image.topk(6).indices.sort().values)


def test_sparsevlm_recycles_dropped_tokens_into_cluster_means():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "sparsevlm", keep=8, layers=(1,)) as pruning:
        model(**batch)
    stage = pruning.last.stages[0]
    merge = stage.merges[0]
    assert stage.kept_per_item[0].numel() == 8  # top-k and recycled clusters together fill the budget
    assert torch.equal(merge.indices, stage.kept_per_item[0]) and merge.features.shape[0] == 8
    # the top tokens keep their own hidden states; the recycled ones carry cluster means
    from vtprune.methods.sparsevlm import recycled_clusters

    top = next(t for t in range(8, 0, -1) if t + recycled_clusters(64 - t) <= 8 or t == 1)
    assert 8 - top == min(recycled_clusters(64 - top), 8 - top) > 0
