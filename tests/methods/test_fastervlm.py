"""FasterVLM: [CLS] attention top-k in every view, against a per-view reference on LLaVA-NeXT."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import Image, make_batch, tiny_model
from tests.methods.common import _single_item_context, _tower_cls_attention
from vtprune.core.context import ItemView
from vtprune.core.layout import VisualItem
from vtprune.core.registry import Stage


def test_fastervlm_keeps_its_budget_in_every_view():
    rows = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.05]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, -1])  # two views and a newline
    selectable = groups >= 0
    item = VisualItem(0, 0, "image", 7, 0, structural=~selectable)
    view = ItemView(item, 0, torch.arange(7), torch.arange(7), selectable, 4, cls_attention=rows, groups=groups,
                    group_budgets={0: 2, 1: 2})
    ctx = _single_item_context(7, 4, Stage(layer=None, per_crop=True, vision_layers=(22,)))
    ctx.items = [view]
    assert sorted(vtprune.FasterVLM().select(ctx)[0].tolist()) == [0, 1, 4, 5]  # top 2 of each view, not top 4


def test_fastervlm_matches_a_per_view_reference_on_llava_next():
    model = tiny_model("llava_next")
    batch = make_batch(model, [[2, Image((32, 48)), 3], [1, Image((64, 64)), 2]])
    keep = 5
    with vtprune.wrap(model, "fastervlm", keep=keep) as pruning:
        model(**batch)
    vlm = model.model
    pixels = torch.cat([batch["pixel_values"][0, :3], batch["pixel_values"][1, :5]])  # each image's real views
    cls = _tower_cls_attention(model, pixels)[1]  # penultimate layer, [8 views, 65]
    features = vlm.get_image_features(batch["pixel_values"], batch["image_sizes"], output_hidden_states=True)
    encoder = vlm.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    projected = vlm.multi_modal_projector(encoder[:, 1:])  # [views, 64, D]
    first_view = [0, 3]
    for image, (packed, kept) in enumerate(zip(features.pooler_output, pruning.last.stages[0].kept_per_item)):
        # find every packed token's view and patch by brute-force matching its feature vector
        owner = {}
        for token, vector in enumerate(packed):
            match = (projected == vector).all(-1).nonzero()
            if len(match):
                owner[token] = (int(match[0, 0]), int(match[0, 1]))
        expected = set(t for t in range(len(packed)) if t not in owner)  # newlines
        views = sorted({v for v, _ in owner.values()})
        assert views == list(range(first_view[image], first_view[image] + len(views)))
        for view in views:
            mine = [t for t, (v, _) in owner.items() if v == view]
            scores = torch.tensor([float(cls[view, 1 + owner[t][1]]) for t in mine])
            expected |= {mine[i] for i in scores.topk(min(keep, len(mine))).indices.tolist()}
        assert kept.tolist() == sorted(expected)
