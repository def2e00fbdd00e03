"""EViT (Liang et al., ICLR 2022): the most [CLS]-attended rows are kept, the rest fused by attention."""

from __future__ import annotations

import torch

from tests.methods.vit_common import reduce_context as _context
from vtprune.methods.evit import EViT


def test_evit_keeps_the_most_attended_rows_and_fuses_the_rest_by_attention():
    # [CLS] query = e0; keys give the patch rows logits 0, 3, 1, 2, 5 (scaled by 1/sqrt(d) = 1/2 for d=4)
    logits = torch.tensor([0.0, 0.0, 3.0, 1.0, 2.0, 5.0])
    keys = torch.zeros(1, 6, 4)
    keys[0, :, 0] = logits * 2
    queries = torch.zeros(1, 6, 4)
    queries[0, 0, 0] = 1.0
    x = torch.randn(1, 6, 3)
    new_x, sizes, origin = EViT().reduce(_context(x, keys, queries, target=3))
    attention = logits.softmax(-1)[1:]  # [CLS]'s attention to the 5 patches
    kept = [5, 2]  # the two largest logits (5 and 3), kept in raster order -> rows 2, 5
    torch.testing.assert_close(new_x[0, 1:3], x[0, sorted(kept)])
    rest = [1, 3, 4]
    fused = (x[0, rest] * attention[[r - 1 for r in rest]][:, None]).sum(0)  # the authors' unnormalised sum
    torch.testing.assert_close(new_x[0, 3], fused)
    torch.testing.assert_close(new_x[0, 0], x[0, 0])
    assert sizes[0].tolist() == [1, 1, 1, 3]
    assert origin[0].tolist() == [10, 12, 15, 11]  # [CLS], the kept rows, the fused row where its first member was
