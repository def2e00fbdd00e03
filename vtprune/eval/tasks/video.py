"""``vtprune_digits_video``: short clips of digit grids that change over time, with questions about time.

A clip has 4, 6 or 8 raw frames (an even count: Qwen2-VL / Qwen2.5-VL encode a video in temporal pairs,
``temporal_patch_size=2``, so 2k raw frames are k Qwen "frames" and none is repeated to pad). Frame 1 is a 4 x 4
digit grid as in ``vtprune_digits`` (4-6 digits); each later frame removes one digit (never the last one) and adds
one digit whose value the previous frame does not show, at an empty cell, so exactly one digit value is new in
every frame. Question types, each with a one-word answer scored by exact match of the first word:

* ``last``:   "which digit is new in the last frame ?"         -> "7"  (the digit the last frame added)
* ``frames``: "how many frames show a 7 ?"                      -> "3"  (0 .. frames)
* ``first``:  "in which frame does the 3 first appear ?"        -> "2"  (1-based; the digit appears somewhere)

Metrics as for ``vtprune_digits``: ``accuracy`` over documents and ``type_accuracy`` (mean over the three types).

Visual input: ``doc_to_visual`` returns one video as lmms-eval's media dict ``{"type": "video", "url": frames}``
with ``frames`` a list of RGB ``PIL.Image`` (64 x 64), not a file path: no video file or decoder is needed.
vtprune's lmms-eval model passes the frames to the processor as ``videos=[frames]`` (one list of frames per
video), so only families whose processor has a video processor can run the task (Qwen2-VL, Qwen2.5-VL); others
get a clear error. Frames come from :func:`vtprune.data.digit_grids.render` on the test split's digits (seed 3,
used by no other task); the JSONL file holds digit indices only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vtprune.data.digit_grids import GridSpec, labels_of, render, source_pool
from vtprune.eval.tasks import process_results  # noqa: F401  (the YAML names it here: same scoring)

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "digits_video_test.jsonl"
VIDEO_TYPES = ("last", "frames", "first")
FRAME_COUNTS = (4, 6, 8)  # raw frames; even, see the module docstring
DOCUMENTS = 150
SEED = 3
SPEC = GridSpec(min_digits=4, max_digits=6)


def _clip(rng: random.Random, pool: tuple[int, ...], frames: int) -> list[list[int]]:
    """``frames`` grids (digit indices, -1 empty): each after the first drops one digit and adds one whose value
    the previous grid lacks."""
    cells = [-1] * (SPEC.rows * SPEC.cols)
    for position in rng.sample(range(len(cells)), rng.randint(SPEC.min_digits, SPEC.max_digits)):
        cells[position] = rng.choice(pool)
    clip = [cells]
    by_label: dict[int, list[int]] = {}
    for source in pool:
        by_label.setdefault(labels_of([source])[0], []).append(source)
    while len(clip) < frames:
        cells = list(clip[-1])
        filled = [i for i, c in enumerate(cells) if c >= 0]
        cells[rng.choice(filled)] = -1  # 4+ digits: one always stays
        shown = set(labels_of(clip[-1]))
        new_label = rng.choice(sorted(set(range(10)) - shown))
        empty = [i for i, c in enumerate(cells) if c < 0 and clip[-1][i] < 0]  # not the cell just emptied
        cells[rng.choice(empty)] = rng.choice(by_label[new_label])
        clip.append(cells)
    return clip


def _ask(kind: str, rng: random.Random, clip: list[list[int]]) -> tuple[str, str]:
    labels = [set(labels_of(frame)) - {-1} for frame in clip]
    if kind == "last":
        (new,) = labels[-1] - labels[-2]
        return "which digit is new in the last frame ?", str(new)
    present = sorted(set().union(*labels))
    if kind == "frames":
        digit = rng.choice(present) if rng.random() < 0.8 else rng.randrange(10)
        return f"how many frames show a {digit} ?", str(sum(digit in shown for shown in labels))
    first = {digit: next(i for i, shown in enumerate(labels) if digit in shown) for digit in present}
    later = [digit for digit in present if first[digit] > 0]
    # most digits are in frame 1; ask mostly about those that arrive later, so "1" is not the usual answer
    digit = rng.choice(later) if later and rng.random() < 0.75 else rng.choice(present)
    return f"in which frame does the {digit} first appear ?", str(first[digit] + 1)


def video_documents(count: int = DOCUMENTS, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` clip documents of the test split, the question types in turn; deterministic in ``seed``."""
    pool = source_pool("test")
    rng = random.Random(f"video-{seed}")
    docs = []
    for index in range(count):
        kind = VIDEO_TYPES[index % len(VIDEO_TYPES)]
        clip = _clip(rng, pool, rng.choice(FRAME_COUNTS))
        question, answer = _ask(kind, rng, clip)
        docs.append({
            "id": f"video-{seed}-{index}", "type": kind, "question": question, "answer": answer,
            "rows": SPEC.rows, "cols": SPEC.cols, "cell": SPEC.cell, "frames": clip,
        })  # fmt: skip
    return docs


def write_data_file() -> None:
    """Rewrite the shipped JSONL file (only after changing the generator on purpose)."""
    DATA_FILE.write_text("".join(json.dumps(doc) + "\n" for doc in video_documents()))


# -- functions the YAML names ----------------------------------------------------------------------------------


def frames(doc: dict[str, Any]) -> list[Any]:
    """The clip's frames as RGB ``PIL.Image`` s, in order."""
    geometry = {key: doc[key] for key in ("rows", "cols", "cell")}
    return [render({**geometry, "cells": cells}) for cells in doc["frames"]]


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [{"type": "video", "url": frames(doc)}]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"
