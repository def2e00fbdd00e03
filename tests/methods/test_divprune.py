"""DivPrune: max-min diverse picks, against a plain loop reference and on a model."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model
from vtprune.methods.divprune import max_min_diverse


def test_divprune_picks_the_spread_out_tokens():
    directions = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.0]])
    picked = max_min_diverse(directions, 3).tolist()
    assert sorted(picked) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])  # one of each cluster
    assert 4 in picked[:2]  # the isolated token is among the first picks


def test_divprune_matches_a_plain_loop_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(12, 6, generator=generator)
        k = int(torch.randint(1, 12, (1,), generator=generator))
        normed = x / x.norm(dim=-1, keepdim=True)
        distance = 1 - normed @ normed.T
        nearest = [sorted(distance[:, j].tolist())[1] for j in range(12)]
        chosen = [max(range(12), key=lambda j: nearest[j])]
        while len(chosen) < k:
            chosen.append(max((j for j in range(12) if j not in chosen), key=lambda j: min(distance[s, j] for s in chosen)))
        assert max_min_diverse(x, k).tolist() == chosen


def test_divprune_on_a_model_uses_the_projected_tokens():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "divprune", keep=6) as pruning:
        model(**batch)
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    for image, kept in zip(features, pruning.last.stages[0].kept_per_item):
        assert torch.equal(kept, max_min_diverse(image, 6).sort().values)
