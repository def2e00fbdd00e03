"""Digit scenes: a segmentation task from data that ships in scikit-learn (no download).

Each scene is a crop of one of scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``), darkened, with
a few handwritten digits (the UCI scans of ``load_digits``, upscaled) painted on it in random colours. The label
map has 11 classes: 0 = background, ``d + 1`` = digit ``d`` on the digit's strokes (ink >= 0.5) thickened by
``SceneSpec.thicken`` pixels, so that a region, not a hairline, is to be found at patch resolution (with 4-pixel
patches the best patch-level map reaches about 0.92 mIoU on it; on the bare strokes, 0.66).

Splits are disjoint twice over: digits come from the train / test pools of :mod:`vtprune.data.digit_grids`, and
backgrounds from different columns of each photograph (train: the left 70 %, test: the rest). A scene is rebuilt
exactly from ``(split, index, seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import binary_dilation

from vtprune.data.digit_grids import SPLITS, _digits, source_pool

CLASSES = ("background", *(str(d) for d in range(10)))
TRAIN_COLUMNS = 0.7  # share of each photograph's width that train backgrounds come from


@dataclass(frozen=True)
class SceneSpec:
    """Scene geometry: ``size`` square pixels, ``min_digits..max_digits`` digits, each 8x8 scan upscaled by an
    integer factor in ``scales``."""

    size: int = 64
    min_digits: int = 2
    max_digits: int = 4
    scales: tuple[int, ...] = (2, 3)
    lattice: int = 4  # digits' corners on multiples of this many pixels (the segmenter's patch: learns faster)
    thicken: int = 2  # label pixels within this many of the strokes


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(image, dtype=np.float32) / 255.0 for image in load_sample_images().images)


def _background(rng: random.Random, split: str, size: int) -> np.ndarray:
    from PIL import Image

    photo = rng.choice(_photos())
    height, width, _ = photo.shape
    cut = int(width * TRAIN_COLUMNS)
    low, high = (0, cut) if split == "train" else (cut, width)
    side = rng.randint(size, min(4 * size, high - low, height))  # zoom between 1x and 4x
    left = rng.randint(low, high - side)
    top = rng.randint(0, height - side)
    crop = Image.fromarray((photo[top : top + side, left : left + side] * 255).astype(np.uint8))
    pixels = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return pixels * rng.uniform(0.35, 0.7)  # darker than the ink, but still textured


def scene(split: str, index: int, *, seed: int = 0, spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split``: an ``[H, W, 3]`` uint8 image and its ``[H, W]`` int64 class map."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, targets = _digits()
    pool = source_pool(split)
    rng = random.Random(f"scene-{split}-{seed}-{index}")
    canvas = _background(rng, split, spec.size)
    labels = np.zeros((spec.size, spec.size), dtype=np.int64)
    boxes: list[tuple[int, int, int]] = []
    for _ in range(rng.randint(spec.min_digits, spec.max_digits)):
        source = rng.choice(pool)
        scale = rng.choice(spec.scales)
        ink = np.kron(images[source], np.ones((scale, scale), dtype=np.float32))
        side = ink.shape[0]
        for _attempt in range(20):  # digits may touch but not overlap: each stays readable
            top, left = (rng.randrange(0, spec.size - side + 1, spec.lattice) for _ in range(2))
            if all(top >= t + s or t >= top + side or left >= l + s or l >= left + side for t, l, s in boxes):
                break
        else:
            continue
        boxes.append((top, left, side))
        colour = np.array([rng.uniform(0.6, 1.0) for _ in range(3)], dtype=np.float32)
        colour[rng.randrange(3)] = 1.0  # at least one bright channel
        region = canvas[top : top + side, left : left + side]
        alpha = ink[..., None]
        region[:] = region * (1 - alpha) + colour * alpha
        strokes = np.zeros_like(labels, dtype=bool)
        strokes[top : top + side, left : left + side] = ink >= 0.5
        if spec.thicken:
            strokes = binary_dilation(strokes, iterations=spec.thicken)
        labels[strokes] = int(targets[source]) + 1
    return (canvas * 255).round().astype(np.uint8), labels


def scenes(
    split: str, start: int, count: int, *, seed: int = 0, spec: SceneSpec = SceneSpec()
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``start .. start + count - 1`` stacked: ``[n, H, W, 3]`` uint8 images, ``[n, H, W]`` class maps."""
    pairs = [scene(split, start + i, seed=seed, spec=spec) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
