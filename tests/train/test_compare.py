"""The held-out comparison's matching: each trained point against the best training-free point at equal cost."""

from __future__ import annotations

from vtprune.train.compare import matched


def point(method: str, accuracy: float, tokens: float, gflops: float, trained: bool = False) -> dict:
    return {"method": method, "keep": 8, "accuracy": accuracy, "visual_tokens_per_layer": tokens,
            "llm_gflops": gflops, "trained": trained}  # fmt: skip


def test_the_best_training_free_point_at_equal_or_lower_cost_within_two_percent():
    points = [
        point("dense", 0.99, 64, 1.0),
        point("mine", 0.90, 20, 0.30, trained=True),
        point("cheap", 0.80, 10, 0.20),
        point("level", 0.85, 20.3, 0.305),  # within 2 %: counts as equal cost
        point("dearer", 0.99, 30, 0.40),  # more accurate, but costs more: never the match
        point("other-trained", 0.95, 5, 0.1, trained=True),  # trained points are not competitors
    ]
    rows = {row["trained"]["method"]: row for row in matched(points)}
    assert set(rows) == {"mine", "other-trained"}
    assert rows["mine"]["best_at_flops"]["method"] == rows["mine"]["best_at_tokens"]["method"] == "level"
    assert rows["other-trained"]["best_at_flops"] is None  # nothing training-free is that cheap
