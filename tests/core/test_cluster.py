"""DPC-kNN (vtprune.core.cluster) on hand-made points whose centres and assignment are known."""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.core.cluster import density_peak_centers, density_peaks, nearest_center


def two_blobs() -> torch.Tensor:
    # a tight blob around (0, 0) with its middle at row 1, and a looser one around (10, 0) with its middle at row 4
    return torch.tensor([[-0.1, 0.0], [0.0, 0.0], [0.1, 0.0], [9.0, 0.0], [10.0, 0.0], [11.0, 0.0]])


def test_density_is_knn_mean_squared_distance_scaled():
    x = two_blobs()
    peaks = density_peaks(x, k=2)
    d = torch.cdist(x, x) / math.sqrt(2)
    expected = torch.exp(-(d.topk(2, largest=False).values ** 2).mean(-1))
    torch.testing.assert_close(peaks.density, expected)
    # the densest token's delta is the largest distance of all; another's is its distance to the nearest denser one
    densest = int(peaks.density.argmax())
    assert peaks.delta[densest] == pytest.approx(float(d.max()))
    assert densest == 0  # rows 0-2 tie at k=2: the earliest is the densest
    assert peaks.delta[2] == pytest.approx(float(d[2, 1]))  # row 2's nearest denser (earlier, tied) token is row 1


def test_centres_are_each_blobs_middle_and_members_join_them():
    x = two_blobs()
    centers = density_peak_centers(x, count=2, k=3)
    assert sorted(centers.tolist()) == [1, 4]
    assignment = nearest_center(x, centers)
    blob_of = {int(c): i for i, c in enumerate(centers.tolist())}
    assert [assignment[i].item() for i in range(3)] == [blob_of[1]] * 3
    assert [assignment[i].item() for i in range(3, 6)] == [blob_of[4]] * 3


def test_ties_go_to_the_earlier_token_without_randomness():
    x = torch.tensor([[0.0], [0.0], [5.0], [5.0]])  # two duplicate pairs: all densities tie within a pair
    peaks = density_peaks(x, k=2)
    assert peaks.delta[1] == 0 and peaks.delta[3] == 0  # the later duplicate has a denser (earlier) twin at 0
    assert sorted(density_peak_centers(x, count=2, k=2).tolist()) == [0, 2]
    assert torch.equal(density_peak_centers(x, 2, 2), density_peak_centers(x, 2, 2))


def test_cosine_assignment_and_centres_own_themselves():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.2], [0.1, 0.5]])
    assert nearest_center(x, torch.tensor([0, 1]), metric="cosine").tolist() == [0, 1, 0, 1]
    # euclidean would send row 2 ([3, 0.2]) to row 0 too, but row 3 is nearer row 1
    assert nearest_center(x, torch.tensor([1, 0])).tolist() == [1, 0, 1, 0]


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="k must be >= 1"):
        density_peaks(torch.zeros(3, 2), k=0)
    with pytest.raises(ValueError, match=r"\[N > 0, D\]"):
        density_peaks(torch.zeros(0, 2), k=1)
    with pytest.raises(ValueError, match="metric must be"):
        nearest_center(torch.zeros(3, 2), torch.tensor([0]), metric="l1")
