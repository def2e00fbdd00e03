"""Seeing what a method keeps: the image with its kept patches highlighted, one panel per method."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn


def kept_mask(record: Any, item: int = 0, grid: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which cells of an item's patch grid survive the record's last stage, and which of those carry merged
    features: two ``[rows, cols]`` bool masks. None where a method re-encoded the image on another grid (the
    original cells no longer map to tokens)."""
    if item >= len(record.item_grids) or grid >= len(record.item_grids[item]):
        raise ValueError(f"item={item}, grid={grid}: the forward has {len(record.item_grids)} items, with "
                         f"{[len(g) for g in record.item_grids]} patch grids each")  # fmt: skip
    offset, rows, cols, stride = record.item_grids[item][grid]
    cells = (offset + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]).flatten()
    merged = torch.zeros(0, dtype=torch.long)
    for stage in record.stages:
        merge = stage.merges.get(item)
        if merge is not None:
            if merge.positions is not None:
                return None
            tokens = merge.indices.cpu()  # already in the item's original numbering
            merged = torch.cat([merged, tokens[merge.combined.cpu()] if merge.combined is not None else tokens])
    present = record.stages[-1].kept_per_item[item].cpu() if record.stages else torch.arange(0)
    kept = torch.isin(cells, present)
    return kept.view(rows, cols), (kept & torch.isin(cells, merged)).view(rows, cols)


def show(
    model: nn.Module,
    inputs: dict[str, Any],
    methods: list[str],
    keep: Any,
    out_dir: str | Path,
    *,
    prompt: str | None = None,
    tokenizer: Any = None,
) -> list[Path]:
    """Write ``<method>.png`` per method (and ``methods.png`` side by side) with the first image's kept patches
    highlighted, dropped ones dimmed and kept ones carrying merged features tinted orange. LLaVA-NeXT shows its
    base (overview) view. Returns the paths written."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's session

    import vtprune

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = vtprune.adapter_for(model)
    image = adapter.display_image(inputs, 0).permute(1, 2, 0).cpu()
    panels = []
    for name in methods:
        with vtprune.wrap(model, name, keep=keep, tokenizer=tokenizer) as pruning, torch.no_grad():
            model(**inputs)
        record = pruning.last
        if not record.item_grids or not record.item_grids[0]:
            raise ValueError("show needs an image as the prompt's first visual item (it got none with a patch grid)")
        panels.append((name, kept_mask(record), record.stages[-1].kept_per_item[0].numel()))
    written = []
    title = f"keep={keep}" + (f" - prompt: {prompt}" if prompt else "")

    def draw(axis, name, masks, count):
        height, width = image.shape[:2]
        if masks is None:  # re-encoded on a smaller grid: every part of the image is still seen, more coarsely
            axis.imshow(image.clamp(0, 1).numpy())
            axis.set_title(f"{name}: {count} tokens, re-encoded", fontsize=9)
            axis.axis("off")
            return

        def upsample(mask):
            return nn.functional.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]

        kept, merged = upsample(masks[0])[..., None], upsample(masks[1])[..., None]
        shown = image * (0.2 + 0.8 * kept)
        shown = shown * (1 - 0.35 * merged) + torch.tensor([1.0, 0.55, 0.0]) * 0.35 * merged
        axis.imshow(shown.clamp(0, 1).numpy())
        note = f", {int(masks[1].sum())} merged" if masks[1].any() else ""
        axis.set_title(f"{name}: {count} kept{note}", fontsize=9)
        axis.axis("off")

    for name, mask, count in panels:
        figure = Figure(figsize=(4, 4.4))
        axis = figure.subplots()
        draw(axis, name, mask, count)
        figure.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize=8)
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110)
        written.append(path)
    figure = Figure(figsize=(3.2 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (name, mask, count) in zip(axes[0], panels):
        draw(axis, name, mask, count)
    figure.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=9)
    figure.tight_layout()
    path = out / "methods.png"
    figure.savefig(path, dpi=110)
    written.append(path)
    return written
