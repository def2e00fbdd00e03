"""Random: seeded per image, uniform over tokens without a seed."""

from __future__ import annotations

import torch

import vtprune
from tests.methods.common import _context
from vtprune.core.registry import Stage


def test_random_is_seeded_per_image_and_differs_between_images():
    ctx = _context([16, 16], [4, 4], Stage(layer=None))
    first = vtprune.Random(seed=0).select(ctx)
    again = vtprune.Random(seed=0).select(ctx)
    other = vtprune.Random(seed=1).select(ctx)
    assert all(torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, again))
    assert not torch.equal(first[0].sort().values, first[1].sort().values)
    assert any(not torch.equal(a.sort().values, b.sort().values) for a, b in zip(first, other))


def test_random_covers_all_tokens_uniformly_without_a_seed():
    ctx = _context([10], [3], Stage(layer=None))
    counts = torch.zeros(10)
    torch.manual_seed(0)
    for _ in range(3000):
        counts[vtprune.Random(seed=None).select(ctx)[0]] += 1
    assert counts.sum() == 9000
    assert (counts / 3000 - 0.3).abs().max() < 0.05
