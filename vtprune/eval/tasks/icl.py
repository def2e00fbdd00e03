"""``vtprune_digits_icl``: few-shot (multimodal in-context learning) digit-grid questions.

Each document holds 2-4 demonstrations, each a digit grid with a question and its answer, then the query grid and
its question, all of one question type (cell / count / exists / left, see :mod:`vtprune.data.digit_grids`), so the
demonstrations show the kind of answer asked for. The prompt (``doc_to_text``) interleaves them, one ``<image>``
placeholder per grid in the order of ``doc_to_visual``'s images:

    <image>
    {question 1}
    Answer: {answer 1}

    <image>
    {question 2}
    Answer: {answer 2}

    <image>
    {query question}
    Answer the question using a single word or phrase.
    Answer:

Scored as ``vtprune_digits`` is: exact match of the answer's first word (``accuracy``; a leading "Answer:" copied
from the demonstrations is dropped first) and the mean over question types (``type_accuracy``). Grids come from
:func:`vtprune.data.digit_grids.generate` on the test split (seed 2, not used by the other tasks) and are grouped by
type in generation order, so the documents are deterministic; the JSONL file holds only digit indices, and the
images are rendered when a document is read, as for the other local tasks.

Several images per prompt: vtprune's lmms-eval model must put each image at its ``<image>`` placeholder for the
demonstrations to read as intended (with the images all first, the text follows them in one block).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vtprune.data.digit_grids import QUESTION_TYPES, generate, render
from vtprune.eval.tasks import process_results as digits_results

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "digits_icl_test.jsonl"
DOCUMENTS = 100
SHOTS = (2, 3, 4)
POOL_SEED = 2
IMAGE = "<image>"
ANSWER_PREFIX = "Answer:"
GEOMETRY = ("rows", "cols", "cell")


def icl_documents(count: int = DOCUMENTS) -> list[dict[str, Any]]:
    """``count`` ICL documents: question types in turn, 2-4 demonstrations each (seeded), every grid used once."""
    rng = random.Random(f"icl-{POOL_SEED}")
    shots = [rng.choice(SHOTS) for _ in range(count)]
    kinds = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(count)]
    needed = {kind: sum(s + 1 for s, k in zip(shots, kinds) if k == kind) for kind in QUESTION_TYPES}
    pool = generate("test", len(QUESTION_TYPES) * max(needed.values()), seed=POOL_SEED)
    by_type = {kind: [doc for doc in pool if doc["type"] == kind] for kind in QUESTION_TYPES}
    documents = []
    for index, (kind, count_shots) in enumerate(zip(kinds, shots)):
        grids = [by_type[kind].pop(0) for _ in range(count_shots + 1)]
        *demos, query = grids
        documents.append({
            "id": f"icl-{POOL_SEED}-{index}", "type": kind, "question": query["question"], "answer": query["answer"],
            **{key: query[key] for key in GEOMETRY}, "cells": query["cells"],
            "shots": [{"question": d["question"], "answer": d["answer"], "cells": d["cells"]} for d in demos],
        })  # fmt: skip
    return documents


def write_data_file() -> None:
    """Rewrite the shipped JSONL file (only after changing the generator on purpose)."""
    DATA_FILE.write_text("".join(json.dumps(doc) + "\n" for doc in icl_documents()))


# -- functions the YAML names ----------------------------------------------------------------------------------


def grids(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The document's grids as digit-grid documents: the demonstrations in order, then the query."""
    geometry = {key: doc[key] for key in GEOMETRY}
    return [{**geometry, **shot} for shot in doc["shots"]] + [
        {**geometry, "question": doc["question"], "answer": doc["answer"], "cells": doc["cells"]}
    ]


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [render(grid) for grid in grids(doc)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    demos = "".join(f"{IMAGE}\n{shot['question']}\n{ANSWER_PREFIX} {shot['answer']}\n\n" for shot in doc["shots"])
    query = f"{IMAGE}\n{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}\nAnswer:"
    return demos + query


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """``vtprune_digits``' scoring, after dropping an "Answer:" the model may repeat from the demonstrations."""
    answer = results[0].strip()
    if answer.lower().startswith(ANSWER_PREFIX.lower()):
        answer = answer[len(ANSWER_PREFIX) :]
    return digits_results(doc, [answer])
