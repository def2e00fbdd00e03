"""Budget arithmetic: keep -> tokens per image, splitting a budget over parts, the pooled grid a budget allows."""

from __future__ import annotations

from vtprune.core.budget import (
    pooled_shape,
    split_budget,
    tokens_to_keep,
    validate_keep,
)


def test_split_budget_proportional_and_exact():
    assert split_budget(10, [576, 0 + 576]) == [5, 5]
    assert split_budget(7, [100, 300]) == [2, 5]
    assert sum(split_budget(13, [3, 50, 9])) == 13
    assert split_budget(5, [2, 100]) == [0, 5]
    assert split_budget(9, [2, 3]) == [2, 3]  # never more than a part holds


def test_pooled_shapes_follow_the_budget_and_aspect():
    assert pooled_shape(24, 24, 144) == (12, 12)
    assert pooled_shape(24, 24, 64) == (8, 8)
    assert pooled_shape(24, 24, 36) == (6, 6)
    assert pooled_shape(24, 24, 60) == (6, 10)  # exactly the budget, as square as it allows
    assert pooled_shape(24, 24, 61) == (6, 10)  # a prime budget keeps the largest grid below it
    assert pooled_shape(8, 16, 32) == (4, 8)
    assert pooled_shape(3, 3, 100) == (3, 3)


def test_tokens_to_keep():
    assert tokens_to_keep(64, 576) == 64
    assert tokens_to_keep(1000, 576) == 576
    assert tokens_to_keep(0.25, 576) == 144
    assert tokens_to_keep(0.1, 576) == 58  # FasterVLM: 90 % reduction -> 58
    assert tokens_to_keep(0.05, 576) == 29
    assert tokens_to_keep(0.001, 576) == 1  # a fraction never drops an image entirely
    assert tokens_to_keep(1.0, 7) == 7
    assert tokens_to_keep(5, 0) == 0
    assert validate_keep(3) == 3 and validate_keep(0.5) == 0.5
