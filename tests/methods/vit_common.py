"""Shared by the ViT method tests: a small timm ViT and hand-made reduction contexts."""

from __future__ import annotations

import pytest
import torch

from vtprune.core.vit import ReduceContext

timm = pytest.importorskip("timm")


def timm_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**options, **kwargs}).eval()


def reduce_context(x, keys, queries=None, sizes=None, prefix=1, target=2, proportional=False):
    batch, rows, _ = x.shape
    queries = keys if queries is None else queries
    sizes = torch.ones(batch, rows) if sizes is None else sizes
    origin = torch.arange(rows).expand(batch, -1) + 10  # representatives need not be 0 .. rows-1
    return ReduceContext(0, x, keys[:, None], queries[:, None], sizes, origin, prefix, target, proportional)
