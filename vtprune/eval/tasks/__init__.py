"""Local lmms-eval tasks: digit grids read from files that ship with the package (no hub, no download).

* ``vtprune_digits``: open questions (cell / count / exists / left, see :mod:`vtprune.data.digit_grids`), scored by
  exact match of the first word; metrics ``accuracy`` (over documents) and ``type_accuracy`` (mean over the four
  question types).
* ``vtprune_digits_yesno``: "is there a 4 ?" as a two-way multiple choice scored by log-likelihood (``acc``).
* ``vtprune_digits_icl``: few-shot grids, several images per document (:mod:`vtprune.eval.tasks.icl`).
* ``vtprune_digits_video``: clips of 4-8 changing grids, one video per document, questions about time ("which digit
  is new in the last frame ?"), scored as ``vtprune_digits`` (:mod:`vtprune.eval.tasks.video`).

lmms-eval reads a task's data from ``data_files`` paths, so :func:`task_dir` writes the task YAMLs with absolute
paths to the shipped JSONL files into a folder and returns it: pass it as ``--include_path`` to ``python -m
lmms_eval`` (``vtprune tasks`` prints it) or as ``TaskManager(include_path=...)``; ``vtprune sweep`` does this itself.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from vtprune.data.digit_grids import generate, normalise_answer, render

HERE = Path(__file__).resolve().parent
DATA_FILES = {
    "vtprune_digits": HERE / "digits_test.jsonl",
    "vtprune_digits_yesno": HERE / "digits_yesno_test.jsonl",
    "vtprune_digits_icl": HERE / "digits_icl_test.jsonl",  # few-shot, several images per document (tasks/icl.py)
    "vtprune_digits_video": HERE / "digits_video_test.jsonl",  # clips of changing grids, one video (tasks/video.py)
}
LOCAL_TASKS = tuple(DATA_FILES)
POST_PROMPT = "\nAnswer the question using a single word or phrase."
_FUNCTIONS = "vtprune.eval.tasks"

# Open questions scored by exact match: the plain task and the few-shot one differ only in name and functions.
_OPEN_QUESTIONS = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {functions}.doc_to_visual
doc_to_text: !function {functions}.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
  until: ["\\n"]
process_results: !function {functions}.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: type_accuracy
    aggregation: !function {results}.type_averaged
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: {post_prompt}
metadata:
  version: 1.0
"""

_YAML = {
    "vtprune_digits": _OPEN_QUESTIONS.replace("{task}", "vtprune_digits").replace("{results}", "{functions}"),
    "vtprune_digits_yesno": """task: vtprune_digits_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function {functions}.doc_to_visual
doc_to_text: !function {functions}.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: {post_prompt}
metadata:
  version: 1.0
""",
    "vtprune_digits_icl": _OPEN_QUESTIONS.replace("{task}", "vtprune_digits_icl")
    .replace("{functions}", "{functions}.icl")
    .replace("{results}", "{functions}"),
    "vtprune_digits_video": _OPEN_QUESTIONS.replace("{task}", "vtprune_digits_video")
    .replace("{functions}", "{functions}.video")
    .replace("{results}", "{functions}"),
}


def expected_documents() -> dict[str, list[dict[str, Any]]]:
    """What the shipped JSONL files hold, regenerated from the seeded generator (tests compare the two)."""
    yes_no = [doc for doc in generate("test", 800, seed=1) if doc["type"] == "exists"][:200]
    return {"vtprune_digits": generate("test", 400, seed=0), "vtprune_digits_yesno": yes_no}


def write_data_files() -> None:
    """Rewrite the shipped JSONL files (only after changing the generator on purpose)."""
    for name, docs in expected_documents().items():
        DATA_FILES[name].write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def task_dir(root: str | Path | None = None) -> Path:
    """A folder holding the local tasks' YAMLs (absolute data paths); default ``$VTPRUNE_TASKS_DIR`` or
    ``~/.cache/vtprune/lmms_tasks``. Checked on every call, so it always points at this installation."""
    folder = Path(root or os.environ.get("VTPRUNE_TASKS_DIR") or Path.home() / ".cache" / "vtprune" / "lmms_tasks")
    folder.mkdir(parents=True, exist_ok=True)
    for name, template in _YAML.items():
        text = template.format(data=json.dumps(str(DATA_FILES[name])), functions=_FUNCTIONS,
                               post_prompt=json.dumps(POST_PROMPT))  # fmt: skip
        _write_if_changed(folder / f"{name}.yaml", text)
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    """Replace ``path`` in one rename: several processes (Ray actors, parallel sweeps) call :func:`task_dir` at once,
    and a reader must never see a YAML another process has just truncated (lmms-eval fails on an empty one)."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


# -- functions the YAMLs name ----------------------------------------------------------------------------------


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [render(doc)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    score = float(normalise_answer(results[0]) == doc["answer"])
    return {"accuracy": score, "type_accuracy": {"type": doc["type"], "score": score}}


def type_averaged(items: list[dict[str, Any]]) -> float:
    """Accuracy per question type, averaged over the types present (each type weighs the same)."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for item in items:
        by_type[item["type"]].append(item["score"])
    return sum(sum(scores) / len(scores) for scores in by_type.values()) / max(len(by_type), 1)
