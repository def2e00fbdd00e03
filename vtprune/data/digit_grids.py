"""Digit grids: real handwritten digits (scikit-learn's copy of the UCI digits, 1,797 8x8 scans) placed on a grid,
with questions whose answers need specific regions of the image. No download: the digits ship in the sklearn wheel.

A document names its digits by their index in ``load_digits()``, so it is a few dozen bytes and the image is
rebuilt exactly by :func:`render`. Source digits are split once (seeded) into train and test pools, so no test
image is ever seen in training. Question types, each with a one-word answer:

* ``cell``:   "what digit is in row two column three ?" -> "7"  (places in words, digits in numerals)
* ``count``:  "how many 7s are there ?"            -> "2"
* ``exists``: "is there a 4 ?"                      -> "yes" / "no"
* ``left``:   "which digit is left of the 9 ?"      -> "3"   (the 9 appears once; its left cell holds a digit)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

QUESTION_TYPES = ("cell", "count", "exists", "left")
# Rows and columns are named in words so a place never reads as a digit: "row 2" would share its token with the
# digit 2 that the other questions look up in the image.
PLACE_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_SHARE = 0.25


@dataclass(frozen=True)
class GridSpec:
    """Grid geometry: ``rows x cols`` cells of ``cell`` pixels, ``min_digits..max_digits`` of them filled."""

    rows: int = 4  # at most len(PLACE_WORDS)
    cols: int = 4
    cell: int = 16
    min_digits: int = 6
    max_digits: int = 10

    @property
    def size(self) -> tuple[int, int]:
        return self.rows * self.cell, self.cols * self.cell


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - the eval extra installs it
        raise ImportError("digit grids need scikit-learn: pip install 'vtprune[eval]'") from error
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


@lru_cache(maxsize=2)
def source_pool(split: str) -> tuple[int, ...]:
    """Indices into ``load_digits()`` that ``split`` may use (a fixed, seeded 75 / 25 split of the 1,797 scans)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, _ = _digits()
    order = list(range(len(images)))
    random.Random(SPLIT_SEED).shuffle(order)
    cut = int(len(order) * (1 - TEST_SHARE))
    return tuple(sorted(order[:cut] if split == "train" else order[cut:]))


def labels_of(cells: list[int]) -> list[int]:
    """The digit in each cell (-1 for an empty cell)."""
    _, targets = _digits()
    return [int(targets[c]) if c >= 0 else -1 for c in cells]


def render(doc: dict[str, Any], cell: int | None = None) -> Any:
    """The document's image as an RGB ``PIL.Image`` (white digits on black, each scan upscaled to its cell)."""
    from PIL import Image

    images, _ = _digits()
    rows, cols = doc["rows"], doc["cols"]
    size = cell or doc.get("cell", GridSpec.cell)
    canvas = np.zeros((rows * size, cols * size), dtype=np.float32)
    scale = size // 8
    margin = (size - 8 * scale) // 2
    for position, source in enumerate(doc["cells"]):
        if source < 0:
            continue
        r, c = divmod(position, cols)
        digit = np.kron(images[source], np.ones((scale, scale), dtype=np.float32))
        top, left = r * size + margin, c * size + margin
        canvas[top : top + 8 * scale, left : left + 8 * scale] = digit
    pixels = (canvas * 255).round().astype(np.uint8)
    return Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB")


def _grid(rng: random.Random, pool: tuple[int, ...], spec: GridSpec) -> list[int]:
    cells = [-1] * (spec.rows * spec.cols)
    filled = rng.sample(range(len(cells)), rng.randint(spec.min_digits, spec.max_digits))
    for position in filled:
        cells[position] = rng.choice(pool)
    return cells


def ask(kind: str, rng: random.Random, cells: list[int], spec: GridSpec = GridSpec()) -> tuple[str, str] | None:
    """A (question, answer) of ``kind`` about the grid ``cells``, or None when the grid cannot pose it."""
    labels = labels_of(cells)
    present = [d for d in labels if d >= 0]
    if kind == "cell":
        position = rng.choice([i for i, d in enumerate(labels) if d >= 0])
        r, c = divmod(position, spec.cols)
        return f"what digit is in row {PLACE_WORDS[r]} column {PLACE_WORDS[c]} ?", str(labels[position])
    if kind == "count":
        digit = rng.choice(present) if rng.random() < 0.8 else rng.randrange(10)
        return f"how many {digit}s are there ?", str(labels.count(digit))
    if kind == "exists":
        want = rng.random() < 0.5  # balanced yes / no
        candidates = sorted(set(present)) if want else sorted(set(range(10)) - set(present))
        if not candidates:
            return None
        return f"is there a {rng.choice(candidates)} ?", "yes" if want else "no"
    anchors = [
        i for i, d in enumerate(labels)
        if d >= 0 and labels.count(d) == 1 and i % spec.cols > 0 and labels[i - 1] >= 0
    ]  # fmt: skip
    if not anchors:
        return None
    anchor = rng.choice(anchors)
    return f"which digit is left of the {labels[anchor]} ?", str(labels[anchor - 1])


def generate(split: str, count: int, *, seed: int = 0, spec: GridSpec = GridSpec()) -> list[dict[str, Any]]:
    """``count`` documents of ``split``, the question types in turn; the same arguments give the same documents."""
    pool = source_pool(split)
    rng = random.Random(f"{split}-{seed}")
    docs: list[dict[str, Any]] = []
    while len(docs) < count:
        kind = QUESTION_TYPES[len(docs) % len(QUESTION_TYPES)]
        cells = _grid(rng, pool, spec)
        asked = ask(kind, rng, cells, spec)
        if asked is None:
            continue
        question, answer = asked
        docs.append({
            "id": f"{split}-{seed}-{len(docs)}", "type": kind, "question": question, "answer": answer,
            "rows": spec.rows, "cols": spec.cols, "cell": spec.cell, "cells": cells,
        })  # fmt: skip
    return docs


def normalise_answer(text: str) -> str:
    """The first word of a model's answer, lower case, without punctuation ("Yes." -> "yes", " 7\\n" -> "7")."""
    words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
    return words[0] if words else ""
