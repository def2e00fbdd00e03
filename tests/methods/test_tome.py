"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching weighted by size, prefix rows protected, proportional
attention."""

from __future__ import annotations

import torch

import vtprune
from tests.methods.vit_common import reduce_context as _context
from tests.methods.vit_common import timm_vit as _timm
from vtprune.methods.tome import ToMe


def test_tome_merges_each_a_row_into_its_most_similar_b_row_weighted_by_size():
    # rows: [CLS], then A/B alternate: 1 A, 2 B, 3 A, 4 B, 5 A, 6 B; keys make 3~4 and 5~2 near-twins
    keys = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                          [0, 0, 0.1, 1], [0, 0, 1, 0.05], [0, 1, 1, 1]]])  # fmt: skip
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    sizes = torch.tensor([[1.0, 1, 1, 2, 3, 1, 1]])
    new_x, new_sizes, origin = ToMe().reduce(_context(x, keys, sizes=sizes, target=4))
    # A rows are the even ones (0 = [CLS], protected), B the odd ones; the reference below matches by brute force
    a_best = {}
    unit = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    for a in (2, 4, 6):
        scores = {b: float(unit[a] @ unit[b]) for b in (1, 3, 5)}
        a_best[a] = max(scores, key=scores.get), max(scores.values())
    merged = sorted(a_best, key=lambda a: -a_best[a][1])[:2]  # r = 6 - 4 = 2
    expected_rows, expected_sizes, slot_of = [], [], {}
    for row in range(7):
        if row not in merged:
            slot_of[row] = len(expected_rows)
            expected_rows.append([row])
    for a in merged:
        expected_rows[slot_of[a_best[a][0]]].append(a)
    for slot, members in enumerate(expected_rows):
        weights = sizes[0, members]
        expected = (x[0, members] * weights[:, None]).sum(0) / weights.sum()
        torch.testing.assert_close(new_x[0, slot], expected)
        expected_sizes.append(float(weights.sum()))
    assert new_sizes[0].tolist() == expected_sizes and new_x.shape == (1, 5, 2)
    assert origin[0].tolist() == [10 + members[0] for members in expected_rows]  # a merged row stays where B was
    assert new_sizes.sum() == sizes.sum()  # every patch is still counted once


def test_tome_never_merges_prefix_rows():
    keys = torch.ones(1, 9, 4)  # every row identical: only the prefix rule decides
    x = torch.randn(1, 9, 3)
    new_x, sizes, _ = ToMe().reduce(_context(x, keys, prefix=3, target=3))
    torch.testing.assert_close(new_x[0, :3], x[0, :3])
    assert sizes[0, :3].tolist() == [1, 1, 1] and sizes.sum() == 9


def test_tome_with_proportional_attention_merging_twins_changes_nothing():
    """Two identical rows merged into one of size 2 attend and are attended exactly as the pair did."""
    model = _timm(depth=3)
    with torch.no_grad():
        model.pos_embed.zero_()
        half = torch.randn(2, 3, 64, 32)
        # every patch equals its right neighbour: columns 2j and 2j+1 of the 8 x 8 patch grid are twins
        images = half.view(2, 3, 64, 4, 8).repeat_interleave(2, dim=3).reshape(2, 3, 64, 64)
        dense = model.forward_features(images)[:, 0]
        with vtprune.wrap(model, "tome", keep=32) as handle:
            handle.plan = {0: 32}  # merge the 32 twin pairs in the first block only
            merged = model.forward_features(images)[:, 0]
            assert handle.last.seq_lens == [65, 33, 33]
        with vtprune.wrap(model, "tome", keep=32, proportional=False) as handle:
            handle.plan = {0: 32}
            plain = model.forward_features(images)[:, 0]
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)
    assert (plain - dense).abs().max() > 1e-3  # without size weighting the merged pair loses half its weight
