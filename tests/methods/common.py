"""Shared helpers of the per-method tests: model descriptions and hand-made pruning contexts."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, Video, collate, make_batch, rows_of, tiny_model
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage

INFO = ModelInfo(family="llava", num_layers=4, has_cls_token=True, mrope=False)
LLAVA = ModelInfo(family="llava", num_layers=32, has_cls_token=True, mrope=False, vision_layers=24, vision_feature_layer=22)
QWEN = ModelInfo(family="qwen_vl", num_layers=28, has_cls_token=False, mrope=True, family_name="Qwen2-VL / Qwen2.5-VL")


def _context(item_tokens: list[int], budgets: list[int], stage: Stage, attention: torch.Tensor | None = None, grids=()):
    """A context with one sample whose items sit back to back from slot 0."""
    items, views, start = [], [], 0
    total = sum(item_tokens)
    for index, (count, budget) in enumerate(zip(item_tokens, budgets)):
        item = VisualItem(index, 0, "image", count, start, grids)
        slots = torch.arange(start, start + count)
        views.append(ItemView(item, index, torch.arange(count), slots, torch.ones(count, dtype=torch.bool), budget))
        items.append(item)
        start += count
    layout = Layout(
        token=torch.arange(total)[None],
        valid=torch.ones(1, total, dtype=torch.bool),
        item=torch.cat([torch.full((c,), i) for i, c in enumerate(item_tokens)])[None],
        item_token=torch.cat([torch.arange(c) for c in item_tokens])[None],
        positions=torch.arange(total)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )
    ctx = PruneContext(stage=stage, model=INFO, layout=layout, items=views)
    if attention is not None:
        ctx.signals = Signals(attention=lambda: attention[None])
    return ctx


def single_item_layout(n: int) -> Layout:
    """The layout of one sample that is one image of ``n`` tokens (slot i = token i)."""
    return Layout(
        token=torch.arange(n)[None],
        valid=torch.ones(1, n, dtype=torch.bool),
        item=torch.zeros(1, n, dtype=torch.long),
        item_token=torch.arange(n)[None],
        positions=torch.arange(n)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )


def _single_item_context(n: int, budget: int, stage: Stage, **view_fields) -> PruneContext:
    item = VisualItem(0, 0, "image", n, 0)
    view = ItemView(item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), budget, **view_fields)
    return PruneContext(stage=stage, model=LLAVA, layout=single_item_layout(n), items=[view])


def _tower_cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Head-averaged [CLS] rows of every tower layer from eager attention maps, [layers, views, T]."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    attentions = tower(pixel_values, output_attentions=True).attentions
    return torch.stack([a.mean(1)[:, 0] for a in attentions])


def video_keep_all(family: str, method: str, frames: int = 3, **options):
    """Check ``method`` at keep=1.0 equals the dense model on an image then a video of ``frames`` temporal frames
    (GLM-4V: the video alone; it fails on both in one call, unwrapped too); returns (model, batch, record)."""
    model = tiny_model(family)
    if family == "llava_onevision":
        image, video = Image((32, 32)), Video(frames)
    else:
        image, video = Image((16, 16)), Video(frames, (16, 24))
    batch = make_batch(model, [[3, video, 4]] if family == "glm4v" else [[3, image, 2, video, 4]])
    dense = model(**batch).logits
    with vtprune.wrap(model, method, keep=1.0, **options) as pruning:
        logits = model(**batch).logits
    assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    return model, batch, pruning.last


def batch_equals_each_alone(family: str, method: str, prompts: list[list], padding_side: str, keep, **options) -> None:
    """A padded batch of ``prompts`` gives each sample the logits (on its kept rows) and the kept tokens, at every
    stage, that the sample gets alone."""
    model = tiny_model(family)
    singles = [make_batch(model, [prompt], seed=i) for i, prompt in enumerate(prompts)]
    batch = collate(model, singles, padding_side=padding_side)
    with vtprune.wrap(model, method, keep=keep, **options) as pruning:
        batched = model(**batch).logits
        index = pruning.last.output_index
        kept = [[k.clone() for k in stage] for stage in pruning.kept]
        for sample, single in enumerate(singles):
            alone = model(**single).logits
            assert_close(
                rows_of(batched, index, sample), rows_of(alone, pruning.last.output_index, 0), rtol=1e-4, atol=1e-4
            )
            for stage, stage_kept in zip(pruning.kept, kept):
                assert torch.equal(stage[0], stage_kept[sample])
