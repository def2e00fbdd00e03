"""Greedy max-min selection (vtprune.core.greedy) on hand-made distances whose pick order is known."""

from __future__ import annotations

import torch

from vtprune.core.greedy import greedy_max_min


def line_distances() -> torch.Tensor:
    points = torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0])  # on a line: distance = |a - b|
    return (points[:, None] - points[None, :]).abs()


def test_each_pick_is_the_point_farthest_from_the_picked_set():
    # from 0: 10 is farthest; then 6 (min distance 4) beats 2 (2); then 2 (min 2 to 0) ...; then 1
    assert greedy_max_min(line_distances(), torch.tensor(0), 5).tolist() == [0, 4, 3, 2, 1]
    assert greedy_max_min(line_distances(), torch.tensor([2]), 3).tolist() == [2, 4, 3]  # 6 is 4 from 2 and 10


def test_a_score_reweights_the_distances_and_picked_rows_never_return():
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])  # row 3 (at 6) can only win once nothing else is left
    picks = greedy_max_min(line_distances(), torch.tensor(0), 5, lambda closest: closest * weight)
    assert picks.tolist() == [0, 4, 2, 1, 3]
    assert greedy_max_min(line_distances(), torch.tensor(0), 0).tolist() == []
    assert greedy_max_min(line_distances(), torch.tensor(0), 9).tolist() == [0, 4, 3, 2, 1]  # capped at n


def test_ties_go_to_the_lowest_index():
    distance = torch.ones(4, 4) - torch.eye(4)  # every pair equally far
    assert greedy_max_min(distance, torch.tensor(1), 4).tolist() == [1, 0, 2, 3]
