"""Seeing what a method keeps: the image on its patch grid with the kept patches outlined, one panel per method."""

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


# How kept and dropped patches look, on dark and light images alike: dropped cells are washed towards slate, kept
# ones keep their pixels and are outlined in yellow over a black halo (yellow shows on dark images, the halo on
# light ones), kept cells carrying merged features are tinted orange, and a grey grid marks every patch.
KEPT_OUTLINE = "#ffe100"
OUTLINE_HALO = "#000000"
DROPPED_TINT = (0.45, 0.5, 0.6)
DROPPED_MIX = 0.65  # share of the tint in a dropped cell
MERGED_TINT = (1.0, 0.55, 0.0)
MERGED_MIX = 0.35
GRID_COLOUR = (0.5, 0.5, 0.5, 0.55)


def outline_segments(kept: torch.Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The edges, in cell units ``(x, y)`` with y down, between kept cells of a ``[rows, cols]`` mask and dropped
    cells or the border: the outline of every kept region."""
    rows, cols = kept.shape
    padded = torch.zeros(rows + 2, cols + 2, dtype=torch.bool)
    padded[1:-1, 1:-1] = kept.bool()
    segments = []
    for r, c in kept.nonzero().tolist():
        if not padded[r, c + 1]:  # above
            segments.append(((c, r), (c + 1, r)))
        if not padded[r + 2, c + 1]:  # below
            segments.append(((c, r + 1), (c + 1, r + 1)))
        if not padded[r + 1, c]:  # left
            segments.append(((c, r), (c, r + 1)))
        if not padded[r + 1, c + 2]:  # right
            segments.append(((c + 1, r), (c + 1, r + 1)))
    return segments


def shade(image: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """``image [H, W, 3]`` in [0, 1] with dropped cells washed towards :data:`DROPPED_TINT` and merged ones tinted
    orange, the ``[rows, cols]`` masks stretched over the pixels."""
    height, width = image.shape[:2]

    def upsample(mask):
        stretched = nn.functional.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")
        return stretched[0, 0, ..., None]

    kept, merged = upsample(kept), upsample(merged)
    shown = image.clamp(0, 1)
    shown = shown * (1 - DROPPED_MIX * (1 - kept)) + torch.tensor(DROPPED_TINT) * DROPPED_MIX * (1 - kept)
    return shown * (1 - MERGED_MIX * merged) + torch.tensor(MERGED_TINT) * MERGED_MIX * merged


def draw_kept(axis: Any, image: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None, title: str) -> None:
    """One panel: ``image [H, W, 3]`` with the ``(kept, merged)`` cell masks of :func:`kept_mask` (None: the method
    re-encoded the image, drawn as it is), the patch grid and the kept cells' outline."""
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection

    axis.set_title(title, fontsize=9)
    axis.axis("off")
    if masks is None:
        axis.imshow(image.clamp(0, 1).numpy())
        return
    rows, cols = masks[0].shape
    axis.imshow(shade(image, *masks).numpy(), extent=(0, cols, rows, 0), interpolation="nearest")
    pixels = axis.get_window_extent().width / max(cols, 1)  # screen pixels per cell
    if pixels >= 4:  # finer grids would be a grey wash
        lines = [((c, 0), (c, rows)) for c in range(1, cols)] + [((0, r), (cols, r)) for r in range(1, rows)]
        axis.add_collection(LineCollection(lines, colors=[GRID_COLOUR], linewidths=0.5))
    width = 1.6 if pixels >= 8 else 0.8
    outline = LineCollection(outline_segments(masks[0]), colors=[KEPT_OUTLINE], linewidths=width, capstyle="projecting")
    outline.set_path_effects([patheffects.withStroke(linewidth=width + 1.6, foreground=OUTLINE_HALO)])
    outline.set_clip_on(False)  # the image's border cells keep their whole outline
    axis.add_collection(outline)
    axis.set_xlim(0, cols)
    axis.set_ylim(rows, 0)


def legend_handles(merged: bool) -> list[Any]:
    """Legend entries for kept / dropped (/ kept with merged features) cells, drawn as the panels draw them."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor="none", edgecolor=KEPT_OUTLINE, linewidth=2, label="kept (outlined)"),
        Patch(facecolor=DROPPED_TINT, edgecolor=GRID_COLOUR, label="dropped (greyed)"),
    ]
    if merged:
        handles.append(Patch(facecolor=MERGED_TINT, edgecolor=KEPT_OUTLINE, linewidth=2, label="kept, merged features"))
    return handles


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
    """Write ``<method>.png`` per method (and ``methods.png`` side by side) with the first image's patch grid drawn,
    kept patches outlined in yellow, dropped ones washed grey-blue and kept ones carrying merged features tinted
    orange, and a legend. LLaVA-NeXT shows its base (overview) view. Returns the paths written."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's session

    import vtprune

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = vtprune.adapter_for(model)
    image = adapter.display_image(inputs, 0).permute(1, 2, 0).cpu().float()
    panels = []
    for name in methods:
        with vtprune.wrap(model, name, keep=keep, tokenizer=tokenizer) as pruning, torch.no_grad():
            model(**inputs)
        record = pruning.last
        if not record.item_grids or not record.item_grids[0]:
            raise ValueError("show needs an image as the prompt's first visual item (it got none with a patch grid)")
        count = record.stages[-1].kept_per_item[0].numel()
        # in-LLM stages keep more before their last one (ATP), an exit keeps none after it (DyVTE): say so
        exit_layer, per_layer = record.exit_layers()[0], record.visual_tokens_per_layer()[0]
        detail = f", all leave at layer {exit_layer}" if exit_layer is not None else ""
        detail += f"; {per_layer:.1f} per layer" if abs(per_layer - count) > 0.05 else ""
        panels.append((name, kept_mask(record), count, detail))
    written = []
    title = f"keep={keep}" + (f" - prompt: {prompt}" if prompt else "")

    def heading(name, masks, count, detail):
        if masks is None:  # re-encoded on a smaller grid: every part of the image is still seen, more coarsely
            return f"{name}: {count} tokens, re-encoded"
        note = f", {int(masks[1].sum())} merged" if masks[1].any() else ""
        return f"{name}: {count} kept{note}{detail}"

    def finish(figure, shown, width):
        masks = [mask for _, mask, _, _ in shown if mask is not None]
        if masks:
            merged = any(bool(mask[1].any()) for mask in masks)
            figure.legend(handles=legend_handles(merged), loc="outside lower center", ncols=3, fontsize=8,
                          frameon=False)  # fmt: skip
        figure.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=8 if width < 100 else 9)

    for name, mask, count, detail in panels:
        figure = Figure(figsize=(4, 4.8), layout="constrained", dpi=110)
        axis = figure.subplots()
        draw_kept(axis, image, mask, heading(name, mask, count, detail))
        finish(figure, [(name, mask, count, detail)], 60)
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110)
        written.append(path)
    figure = Figure(figsize=(3.2 * len(panels), 4.2), layout="constrained", dpi=110)
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (name, mask, count, detail) in zip(axes[0], panels):
        draw_kept(axis, image, mask, heading(name, mask, count, detail))
    finish(figure, panels, 120)
    path = out / "methods.png"
    figure.savefig(path, dpi=110)
    written.append(path)
    return written
