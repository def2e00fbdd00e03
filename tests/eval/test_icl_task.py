"""The few-shot digits task ``vtprune_digits_icl``: documents, answers, the shipped file, loading through lmms-eval's
TaskManager, and several images per document through vtprune's lmms-eval model (LLaVA- and Qwen-style processors)."""

from __future__ import annotations

import json

import pytest

import vtprune.methods.catp  # noqa: F401  (registers "catp"; not yet exported by vtprune.methods)
from vtprune.data.digit_grids import PLACE_WORDS, labels_of, source_pool
from vtprune.eval import tasks as local_tasks
from vtprune.eval.tasks import icl
from vtprune.testing import save_tiny_checkpoint

TASK = "vtprune_digits_icl"


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """One TaskManager for the module (indexing lmms-eval's task folders takes seconds)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_tasks.task_dir(tmp_path_factory.mktemp("lmms_tasks"))))


def _answer(kind: str, question: str, cells: list[int]) -> str:
    """The right answer to a digit-grid question, worked out again from the grid's labels."""
    labels = labels_of(cells)
    words = question.split()
    if kind == "cell":
        return str(labels[PLACE_WORDS.index(words[5]) * 4 + PLACE_WORDS.index(words[7])])
    if kind == "count":
        return str(labels.count(int(words[2][:-1])))
    if kind == "exists":
        return "yes" if int(words[3]) in labels else "no"
    digit = int(words[6])
    assert labels.count(digit) == 1
    return str(labels[labels.index(digit) - 1])


def test_documents_have_2_to_4_demonstrations_of_one_type_with_correct_answers():
    docs = icl.icl_documents()
    assert docs == icl.icl_documents() and len(docs) == icl.DOCUMENTS
    assert {len(doc["shots"]) for doc in docs} == {2, 3, 4}
    assert {doc["type"] for doc in docs} == {"cell", "count", "exists", "left"}
    seen = set()
    for doc in docs:
        for grid in icl.grids(doc):
            assert _answer(doc["type"], grid["question"], grid["cells"]) == grid["answer"]
            assert all(c < 0 or c in source_pool("test") for c in grid["cells"])
            seen.add(json.dumps(grid["cells"]))
    assert len(seen) == sum(len(doc["shots"]) + 1 for doc in docs)  # every grid appears once


def test_shipped_file_matches_the_generator():
    shipped = [json.loads(line) for line in icl.DATA_FILE.read_text().splitlines()]
    assert shipped == icl.icl_documents(), "regenerate with vtprune.eval.tasks.icl.write_data_file()"
    assert local_tasks.DATA_FILES[TASK] == icl.DATA_FILE


def test_prompt_interleaves_one_placeholder_per_image_demonstrations_first():
    doc = icl.icl_documents()[1]
    text = icl.doc_to_text(doc, {"post_prompt": local_tasks.POST_PROMPT})
    images = icl.doc_to_visual(doc)
    parts = text.split(icl.IMAGE)
    assert parts[0] == "" and len(parts) - 1 == len(images) == len(doc["shots"]) + 1
    for part, shot in zip(parts[1:], doc["shots"]):
        assert part == f"\n{shot['question']}\nAnswer: {shot['answer']}\n\n"
    assert parts[-1] == f"\n{doc['question']}{local_tasks.POST_PROMPT}\nAnswer:"
    assert doc["answer"] not in parts[-1].split()  # the query's answer is not given away
    assert [image.size for image in images] == [(64, 64)] * len(images)


def test_scoring_drops_a_repeated_answer_prefix():
    doc = {"type": "count", "answer": "2"}
    assert icl.process_results(doc, [" Answer: 2"])["accuracy"] == 1.0
    assert icl.process_results(doc, ["2."])["accuracy"] == 1.0
    assert icl.process_results(doc, ["answer 3"])["accuracy"] == 0.0


def test_task_loads_through_the_task_manager(manager):
    from lmms_eval.tasks import get_task_dict

    assert TASK in manager.all_tasks
    task = get_task_dict([TASK], manager)[TASK]
    docs = list(task.test_docs())
    assert len(docs) == icl.DOCUMENTS
    counts = [len(task.doc_to_visual(doc)) for doc in docs[:12]]
    assert set(counts) == {3, 4, 5}  # 2-4 demonstrations + the query
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_documents_reach_the_model_with_all_their_images(family, tmp_path, manager):
    from lmms_eval.evaluator import simple_evaluate

    from vtprune.eval.lmms_model import VtpruneLMM

    checkpoint = save_tiny_checkpoint(family, tmp_path / family)
    lm = VtpruneLMM(pretrained=str(checkpoint), method="catp", keep=4, batch_size=1)
    seen = []
    original = lm._encode

    def encode(texts, images):
        inputs = original(texts, images)
        seen.append(len(images))
        return inputs

    lm._encode = encode
    output = simple_evaluate(model=lm, tasks=[TASK], limit=3, task_manager=manager, log_samples=True, bootstrap_iters=0,
                             verbosity="WARNING")  # fmt: skip
    assert "accuracy,none" in output["results"][TASK]
    docs = [json.loads(line) for line in icl.DATA_FILE.read_text().splitlines()]
    expected = sorted(len(docs[sample["doc_id"]]["shots"]) + 1 for sample in output["samples"][TASK])
    assert sorted(seen) == expected
    record = lm.pruning.last
    assert len(record.items) == seen[-1]  # every image reached the LLM as its own item, pruned to its budget
    assert all(kept.numel() <= 4 for kept in record.stages[-1].kept_per_item)
    lm.close()


@pytest.mark.parametrize("family,marker", [("llava", "<image>"), ("qwen2_vl", "<|image_pad|>")])
def test_each_image_sits_at_its_placeholder_in_the_model_prompt(family, marker, tmp_path):
    from vtprune.eval.lmms_model import VtpruneLMM

    lm = VtpruneLMM(pretrained=str(save_tiny_checkpoint(family, tmp_path / family)), method="catp", keep=4)
    doc = icl.icl_documents()[2]
    prompt = lm._prompt(icl.doc_to_text(doc, {"post_prompt": local_tasks.POST_PROMPT}), icl.doc_to_visual(doc))
    lm.close()
    pieces = prompt.split(marker)
    assert len(pieces) == len(doc["shots"]) + 2
    for piece, shot in zip(pieces[1:], doc["shots"]):  # after image i: demonstration i's question and answer
        assert f"{shot['question']}\nAnswer: {shot['answer']}" in piece
    assert doc["question"] in pieces[-1] and "Answer:" not in pieces[0]  # nothing before the first image
