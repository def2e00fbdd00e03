"""InternVL adapter: tiles regrouped into images by the prompt's placeholder runs, one budget per image."""

from __future__ import annotations

import functools

import pytest
import torch

import vtprune
from tests.helpers import Image, make_batch, tiny_model
from vtprune.core.adapter import pixel_shuffle_groups


def test_tiles_are_regrouped_so_the_budget_applies_per_image():
    model = tiny_model("internvl")
    batch = make_batch(model, [[3, Image((32, 64)), 2, Image((32, 32)), 4]])  # 2 tiles + thumbnail, then 1 tile
    assert batch["pixel_values"].shape[0] == 4
    with vtprune.wrap(model, "random", keep=6) as pruning:
        model(**batch)
    record = pruning.last
    assert [item["num_tokens"] for item in record.items] == [48, 16]
    assert record.item_grids[0] == [(0, 4, 4, 4), (16, 4, 4, 4), (32, 4, 4, 4)]  # one grid per tile
    assert [k.numel() for k in record.stages[0].kept_per_item] == [6, 6]


def test_tower_features_are_the_means_of_each_tokens_patch_group():
    model = tiny_model("internvl")
    shuffle = functools.partial(model.model.pixel_shuffle, scale_factor=0.5)
    groups = pixel_shuffle_groups(shuffle, 8)
    assert groups[0].tolist() == [0, 1, 8, 9] and groups[5].tolist() == [18, 19, 26, 27]  # token (1, 1): rows 2-3
    batch = make_batch(model, [[3, Image((32, 64)), 4]])
    with vtprune.wrap(model, "mmtok", keep=4) as pruning:
        model(**batch)
    assert [k.numel() for k in pruning.last.stages[0].kept_per_item] == [12]  # MMTok's budget per crop (tile)


def test_placeholder_runs_that_do_not_match_the_tiles_are_refused():
    model = tiny_model("internvl")
    batch = make_batch(model, [[3, Image((32, 64)), 4]])
    batch["pixel_values"] = batch["pixel_values"][:2]
    with vtprune.wrap(model, "random", keep=4), pytest.raises(ValueError, match="do not split into the 2 encoded tiles"):
        model(**batch)
    assert torch.is_tensor(batch["input_ids"])
