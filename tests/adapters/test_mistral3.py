"""Mistral 3 adapter: native-resolution grids per image; [IMG_BREAK] / [IMG_END] stay whatever is dropped."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import Image, make_batch, tiny_model
from vtprune.testing import IMAGE_BREAK, IMAGE_END, IMAGE_TOKEN


def test_each_image_is_budgeted_on_its_own_grid_and_row_breaks_stay():
    model = tiny_model("mistral3")
    batch = make_batch(model, [[3, Image((32, 24)), 2, Image((16, 32)), 4]])
    with vtprune.wrap(model, "random", keep=5) as pruning:
        model(**batch)
    record = pruning.last
    assert record.item_grids == [[(0, 4, 3, 3)], [(0, 2, 4, 4)]]  # (rows, cols) of 8 px tokens
    assert [k.numel() for k in record.stages[0].kept_per_item] == [5, 5]
    ids = batch["input_ids"][0][record.output_index[0]]
    assert int((ids == IMAGE_TOKEN).sum()) == 10
    # 4 + 2 rows: a break after each row but the last, which [IMG_END] closes
    assert int((ids == IMAGE_BREAK).sum()) == 4 and int((ids == IMAGE_END).sum()) == 2
    assert torch.equal(ids[ids != IMAGE_TOKEN], batch["input_ids"][0][batch["input_ids"][0] != IMAGE_TOKEN])
