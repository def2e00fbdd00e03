"""Segmentation quality and cost of a DToP segmenter at several exit thresholds: mIoU and FLOPs per image.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` one image at a time, so the padding that a batched
forward carries (images keep different numbers of tokens) is not counted: the figure is what a per-image run
costs, as in the authors' loop. mIoU runs batched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from vtprune.methods.dtop import DToPSegmenter


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


def flops_per_image(model: DToPSegmenter, images: Tensor, thresh: float) -> list[int]:
    """FLOPs of each image's forward alone at ``thresh``."""
    counts = []
    with torch.no_grad():
        for image in images:
            with FlopCounterMode(display=False) as counter:
                model(image[None], thresh=thresh)
            counts.append(counter.get_total_flops())
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
    flop_images: int | None = None, out: Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per threshold: mIoU on ``(images [n, 3, H, W], labels [n, H, W])``, mean GFLOPs per image (over the
    first ``flop_images``; all by default), the share of token-blocks run, and tokens exited per stage.

    With ``out``, rows are appended to that JSON-lines file as they finish and thresholds already there (for the same
    images and the same weights) are read back instead of recomputed.
    """
    weights = weights_fingerprint(model)
    counted = images[: flop_images or len(images)]
    done: dict[float, dict[str, Any]] = {}
    if out is not None and Path(out).exists():
        for line in Path(out).read_text().splitlines():
            row = json.loads(line)
            if (row.get("images"), row.get("flop_images"), row.get("weights")) == (len(images), len(counted), weights):
                done[row["thresh"]] = row
    rows, depth = [], len(model.backbone.blocks)
    for thresh in thresholds:
        if thresh in done:
            rows.append(done[thresh])
            continue
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
        flops = flops_per_image(model, counted, thresh)
        row = {
            "thresh": thresh, "images": len(images), "miou": mean_iou(matrix),
            "gflops": sum(flops) / len(flops) / 1e9, "flop_images": len(counted),
            "token_blocks": token_blocks / dense_blocks,
            "exited_after_block": {str(b): int(exits[b]) for b in model.stages[:-1]},
            "iou_per_class": [round(float(v), 4) for v in iou_per_class(matrix)], "weights": weights,
        }  # fmt: skip
        rows.append(row)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    return rows


def plot_exits(model: DToPSegmenter, pixels: Tensor, images: Tensor, labels: Tensor, thresh: float, path: Path) -> Path:
    """A picture per scene: the image, the true classes, DToP's classes at ``thresh``, and the block after which
    each token stopped (darker = earlier). ``pixels`` are the ``[n, H, W, 3]`` uint8 images behind ``images``."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's session

    with torch.no_grad():
        result = model(images, thresh=thresh)
    predicted = result.labels(tuple(labels.shape[-2:]))
    stops = result.exit_block.unflatten(1, model.grid)
    depth = len(model.backbone.blocks)
    classes = ListedColormap(["#202020", *[f"C{c}" for c in range(model.classes - 1)]])
    figure = Figure(figsize=(8, 2.1 * len(images)))
    axes = figure.subplots(len(images), 4, squeeze=False)
    for row, panels in enumerate(axes):
        exited = int((result.exit_block[row] < depth - 1).sum())
        shown = [(pixels[row], "image", {}),
                 (labels[row], "truth", {"cmap": classes, "vmin": 0, "vmax": model.classes - 1}),
                 (predicted[row], f"DToP {thresh:g}", {"cmap": classes, "vmin": 0, "vmax": model.classes - 1}),
                 (stops[row] + 1, f"exit block ({exited} early)", {"cmap": "viridis", "vmin": 1, "vmax": depth})]  # fmt: skip
        for axis, (picture, title, style) in zip(panels, shown):
            axis.imshow(picture, interpolation="nearest", **style)
            axis.set_title(title, fontsize=8)
            axis.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
