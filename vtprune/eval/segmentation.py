"""Segmentation quality and cost of a DToP segmenter at several exit thresholds: mIoU and FLOPs per image.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` one image at a time, so the padding that a batched
forward carries (images keep different numbers of tokens) is not counted: the figure is what a per-image run
costs, as in the authors' loop. mIoU runs batched.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from vtprune.methods.dtop import DToPSegmenter

if TYPE_CHECKING:  # rich is only needed by callers that pass a progress bar or a console
    from rich.console import Console
    from rich.progress import Progress


def confusion(pred: Tensor, target: Tensor, classes: int) -> Tensor:
    """``[classes, classes]`` pixel counts, rows = true class, columns = predicted."""
    pairs = target.flatten().long() * classes + pred.flatten().long()
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def iou_per_class(matrix: Tensor) -> Tensor:
    """IoU of each class from a confusion matrix (NaN for a class absent from both prediction and truth)."""
    hits = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(matrix: Tensor) -> float:
    """Mean over the classes that occur (in truth or prediction) of their IoU."""
    return float(iou_per_class(matrix).nanmean())


def flops_per_image(
    model: DToPSegmenter, images: Tensor, thresh: float, on_image: Callable[[], None] | None = None
) -> list[int]:
    """FLOPs of each image's forward alone at ``thresh``; ``on_image()`` runs after each (progress)."""
    counts = []
    with torch.no_grad():
        for image in images:
            with FlopCounterMode(display=False) as counter:
                model(image[None], thresh=thresh)
            counts.append(counter.get_total_flops())
            if on_image is not None:
                on_image()
    return counts


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of the model's weights: results saved for other weights are not reused."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:12]


def evaluate_thresholds(
    model: DToPSegmenter, images: Tensor, labels: Tensor, thresholds: Sequence[float], *, batch: int = 50,
    flop_images: int | None = None, out: Path | None = None, progress: Progress | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per threshold: mIoU on ``(images [n, 3, H, W], labels [n, H, W])``, mean GFLOPs per image (over the
    first ``flop_images``; all by default), the share of token-blocks run, and tokens exited per stage.

    With ``out``, rows are appended to that JSON-lines file as they finish and thresholds already there (for the same
    images and the same weights) are read back instead of recomputed.

    Feedback for long runs (the CLI's defaults take minutes on a CPU): ``progress``, a rich ``Progress``, gets one
    task advanced per image scored and per image FLOP-counted over every threshold still to run; ``console`` (by
    default ``progress.console``; nothing is printed without either) gets a line per finished threshold (mIoU,
    GFLOPs, seconds) and one saying which thresholds were reused from ``out``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if flop_images is not None and flop_images < 1:
        raise ValueError(f"flop_images must be >= 1 (or None for all images), got {flop_images}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label maps")
    if console is None and progress is not None:
        console = progress.console  # printing through the live display keeps the bar below the lines
    weights = weights_fingerprint(model)
    counted = images[: flop_images or len(images)]
    done: dict[float, dict[str, Any]] = {}
    if out is not None and Path(out).exists():
        for line in Path(out).read_text().splitlines():
            row = json.loads(line)
            if (row.get("images"), row.get("flop_images"), row.get("weights")) == (len(images), len(counted), weights):
                done[row["thresh"]] = row
    pending = [thresh for thresh in dict.fromkeys(thresholds) if thresh not in done]
    reused = [thresh for thresh in dict.fromkeys(thresholds) if thresh in done]
    if console is not None and reused:
        console.print(f"reusing {len(reused)} of {len(set(thresholds))} thresholds from {out} "
                      f"({', '.join(f'{t:g}' for t in reused)}); delete it to recompute")  # fmt: skip
    # one unit per image scored (batched) plus one per image FLOP-counted (one by one, about 5x slower per image on
    # a CPU): the FLOP count is most of the wait, so it must move the bar too
    task = None
    if progress is not None and pending:
        task = progress.add_task("DToP", total=len(pending) * (len(images) + len(counted)))
    rows, depth = [], len(model.backbone.blocks)
    for thresh in thresholds:
        if thresh in done:
            rows.append(done[thresh])
            continue
        started = time.perf_counter()
        if task is not None:
            progress.update(task, description=f"DToP thresh {thresh:g}: mIoU")
        matrix = torch.zeros(model.classes, model.classes, dtype=torch.long)
        token_blocks, dense_blocks, exits = 0.0, 0.0, torch.zeros(depth, dtype=torch.long)
        with torch.no_grad():
            for start in range(0, len(images), batch):
                result = model(images[start : start + batch], thresh=thresh)
                predicted = result.labels(tuple(labels.shape[-2:]))
                matrix += confusion(predicted, labels[start : start + batch], model.classes)
                token_blocks += float(result.rows.sum())
                dense_blocks += float(result.rows[:, 0].sum()) * depth  # every row enters the first block
                exits += torch.bincount(result.exit_block.flatten(), minlength=depth)
                if task is not None:
                    progress.advance(task, len(images[start : start + batch]))
        if task is not None:
            progress.update(task, description=f"DToP thresh {thresh:g}: FLOPs")
        # positional: callers (and tests) may stand in for flops_per_image with a plain function
        flops = flops_per_image(model, counted, thresh, (lambda: progress.advance(task)) if task is not None else None)
        row = {
            "thresh": thresh, "images": len(images), "miou": mean_iou(matrix),
            "gflops": sum(flops) / len(flops) / 1e9, "flop_images": len(counted),
            "token_blocks": token_blocks / dense_blocks,
            "exited_after_block": {str(b): int(exits[b]) for b in model.stages[:-1]},
            "iou_per_class": [round(float(v), 4) for v in iou_per_class(matrix)], "weights": weights,
        }  # fmt: skip
        rows.append(row)
        done[thresh] = row  # a threshold listed twice is computed once
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        if console is not None:
            seconds = time.perf_counter() - started
            console.print(f"thresh {thresh:g}: mIoU {row['miou']:.4f}, {row['gflops']:.4f} GFLOPs/image, "
                          f"{row['token_blocks']:.1%} token-blocks run, {seconds:.1f} s")  # fmt: skip
    return rows


def plot_exits(
    model: DToPSegmenter, pixels: Tensor, images: Tensor, labels: Tensor, thresh: float, path: Path,
    class_names: Sequence[str] | None = None,
) -> Path:  # fmt: skip
    """A picture per scene: the image, the true classes, DToP's classes at ``thresh``, and the block after which
    each token stopped (darker = earlier), with legends for the classes shown and the exit blocks.
    ``pixels`` are the ``[n, H, W, 3]`` uint8 images behind ``images``; ``class_names`` default to the digit
    scenes' (background, then digits 0-9)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, to_hex
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's session
    from matplotlib.patches import Patch

    with torch.no_grad():
        result = model(images, thresh=thresh)
    predicted = result.labels(tuple(labels.shape[-2:]))
    depth = len(model.backbone.blocks)
    # each token's exit as its stage's index: one flat colour per exit block, viridis from dark (early) to light
    stage_of = torch.full((depth,), len(model.stages) - 1, dtype=torch.long)
    stage_of[torch.tensor(model.stages)] = torch.arange(len(model.stages))
    stops = stage_of[result.exit_block].unflatten(1, model.grid)
    exit_colours = [to_hex(colormaps["viridis"](b / max(depth - 1, 1))) for b in model.stages]
    exit_names = [f"after block {b + 1}" for b in model.stages[:-1]] + [f"ran all {depth} blocks"]
    exits = ListedColormap(exit_colours)
    names = list(class_names) if class_names is not None else ["background", *map(str, range(model.classes - 1))]
    class_colours = ["#202020", *[f"C{c % 10}" for c in range(model.classes - 1)]]
    classes = ListedColormap(class_colours)
    figure = Figure(figsize=(8, 2.1 * len(images) + 0.9), layout="constrained")
    axes = figure.subplots(len(images), 4, squeeze=False)
    for row, panels in enumerate(axes):
        exited = int((result.exit_block[row] < depth - 1).sum())
        shown = [(pixels[row], "image", {}),
                 (labels[row], "truth", {"cmap": classes, "vmin": 0, "vmax": model.classes - 1}),
                 (predicted[row], f"DToP {thresh:g}", {"cmap": classes, "vmin": 0, "vmax": model.classes - 1}),
                 (stops[row], f"exit block ({exited} early)",
                  {"cmap": exits, "vmin": -0.5, "vmax": len(model.stages) - 0.5})]  # fmt: skip
        for axis, (picture, title, style) in zip(panels, shown):
            axis.imshow(picture, interpolation="nearest", **style)
            axis.set_title(title, fontsize=8)
            axis.set_axis_off()
    present = sorted(set(torch.cat([labels.flatten(), predicted.flatten()]).tolist()))
    class_handles = [Patch(facecolor=class_colours[c], label=names[c] if c < len(names) else str(c)) for c in present]
    exit_handles = [Patch(facecolor=colour, label=name) for colour, name in zip(exit_colours, exit_names)]
    figure.legend(handles=class_handles, loc="outside lower left", ncols=min(6, len(class_handles)), fontsize=7,
                  title="class (truth, DToP)", title_fontsize=7)  # fmt: skip
    figure.legend(handles=exit_handles, loc="outside lower right", fontsize=7, title="exit block", title_fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
