"""The lmms-eval model ``vtprune`` through lmms-eval's real evaluator, the local tasks, and sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.data.digit_grids import (
    PLACE_WORDS,
    generate,
    labels_of,
    normalise_answer,
    render,
    source_pool,
)
from vtprune.eval import tasks as local_tasks
from vtprune.eval.sweep import SweepSpec, append_result, read_results
from vtprune.eval.sweep_report import pareto_front
from vtprune.testing import save_tiny_checkpoint

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("ckpt") / "llava")


def _evaluate(lm, tasks, limit):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(local_tasks.task_dir()))
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                           bootstrap_iters=0, verbosity="WARNING")  # fmt: skip


# -- data and tasks ----------------------------------------------------------------------------------------------


def test_digit_grids_are_deterministic_split_and_answerable():
    assert not set(source_pool("train")) & set(source_pool("test"))
    docs = generate("test", 40)
    assert docs == generate("test", 40) and docs != generate("test", 40, seed=1)
    assert {d["type"] for d in docs} == {"cell", "count", "exists", "left"}
    for doc in docs:
        assert all(c < 0 or c in source_pool("test") for c in doc["cells"])
        labels = labels_of(doc["cells"])
        words = doc["question"].split()
        if doc["type"] == "cell":
            r, c = PLACE_WORDS.index(words[5]), PLACE_WORDS.index(words[7])
            assert str(labels[r * doc["cols"] + c]) == doc["answer"]
        elif doc["type"] == "count":
            assert str(labels.count(int(words[2][:-1]))) == doc["answer"]
        elif doc["type"] == "exists":
            assert (int(words[3]) in labels) == (doc["answer"] == "yes")
        else:
            anchor = labels.index(int(words[6]))
            assert labels.count(int(words[6])) == 1 and str(labels[anchor - 1]) == doc["answer"]
    import numpy as np

    pixels = np.asarray(render(docs[0]))[..., 0]
    assert pixels.shape == (64, 64)
    for position, source in enumerate(docs[0]["cells"]):  # ink exactly in the filled cells
        r, c = divmod(position, 4)
        assert (pixels[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].max() > 0) == (source >= 0)


def test_shipped_task_files_match_the_generator():
    for name, docs in local_tasks.expected_documents().items():
        shipped = [json.loads(line) for line in local_tasks.DATA_FILES[name].read_text().splitlines()]
        assert shipped == docs, f"{name}: regenerate with vtprune.eval.tasks.write_data_files()"


def test_task_yamls_are_replaced_whole_never_truncated_in_place(tmp_path):
    # Ray actors call task_dir at once: a reader holding the old file must still read it whole (a rename, not an
    # in-place rewrite), and an up-to-date file is left alone
    yaml = local_tasks.task_dir(tmp_path) / "vtprune_digits.yaml"
    fresh = yaml.read_text()
    yaml.write_text(fresh + "# stale\n")
    with yaml.open() as held:
        local_tasks.task_dir(tmp_path)
        assert held.read() == fresh + "# stale\n"
    assert yaml.read_text() == fresh
    before = yaml.stat()
    local_tasks.task_dir(tmp_path)
    assert (yaml.stat().st_ino, yaml.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(tmp_path.glob(".*.tmp"))


def test_scoring_functions_on_hand_made_answers():
    assert normalise_answer(" Yes.") == "yes" and normalise_answer("7\nthe") == "7" and normalise_answer("") == ""
    doc = {"type": "count", "answer": "2"}
    assert local_tasks.process_results(doc, ["2 sevens"])["accuracy"] == 1.0
    assert local_tasks.process_results(doc, ["3"])["accuracy"] == 0.0
    items = [{"type": "cell", "score": 1.0}, {"type": "cell", "score": 1.0}, {"type": "cell", "score": 1.0},
             {"type": "left", "score": 0.0}]  # fmt: skip
    assert local_tasks.type_averaged(items) == 0.5  # types weigh the same, not documents


# -- the lmms-eval model ---------------------------------------------------------------------------------------


def test_lmms_eval_finds_the_model_by_name():
    from lmms_eval.models import get_model

    from vtprune.eval.lmms_model import VtpruneLMM

    assert get_model("vtprune") is VtpruneLMM


def test_generation_task_through_the_real_evaluator_matches_plain_generate(checkpoint):
    from vtprune.eval.inputs import load_model
    from vtprune.eval.lmms_model import VtpruneLMM

    lm = VtpruneLMM(pretrained=str(checkpoint), method="fastv", keep=8, batch_size=3)
    output = _evaluate(lm, ["vtprune_digits"], 5)
    results = output["results"]["vtprune_digits"]
    assert "accuracy,none" in results and "type_accuracy,none" in results
    samples = output["samples"]["vtprune_digits"]
    cost = lm.cost_summary()
    assert cost["forwards"] == cost["documents"] == 5 and cost["visual_tokens"] == 8 and cost["config"]["method"] == "fastv"
    assert cost["tasks"]["vtprune_digits"]["tflops_prefill"] > 0 and cost["prefill_ms"] > 0
    lm.close()
    # the same prompts through a plain processor + generate on the same model pruned the same way, one at a time
    import vtprune

    model, processor = load_model(str(checkpoint))
    docs = [json.loads(line) for line in local_tasks.DATA_FILES["vtprune_digits"].read_text().splitlines()]
    with vtprune.wrap(model, "fastv", keep=8):
        for sample in samples:
            doc = docs[sample["doc_id"]]
            text = local_tasks.doc_to_text(doc, {"post_prompt": local_tasks.POST_PROMPT})
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=[prompt], images=[render(doc)], return_tensors="pt")
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
            answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert sample["resps"][0][0] == answer.split("\n")[0]


def test_per_sample_costs_follow_each_samples_own_exit_layer():
    """DyVTE's samples leave their visual tokens at different layers of one batch: each sample's FLOPs and layer
    average are its own, the summary counts the exits, and the per-sample FLOPs add up to the batch's."""
    from vtprune.eval.lmms_model import VtpruneLMM

    lm = VtpruneLMM(pretrained="embedded", method="dyvte", keep=1.0, batch_size=8)
    _evaluate(lm, ["vtprune_digits"], 16)
    costs, summary = lm.costs, lm.cost_summary()
    lm.close()
    exits = [cost.get("exit_layer") for cost in costs]
    assert sum(summary["exit_layers"].values()) == sum(e is not None for e in exits) and len(set(exits)) > 1
    # a later exit costs more FLOPs, and a sample exiting at layer l holds its 64 tokens for l of the 8 layers
    cheapest = {}
    for cost in costs:
        layer = cost.get("exit_layer") or 8
        cheapest[layer] = min(cheapest.get(layer, float("inf")), cost["tflops_prefill"])
        assert abs(cost["visual_tokens_per_layer"] - 64 * layer / 8) < 1e-6
    layers = sorted(cheapest)
    assert all(cheapest[a] < cheapest[b] for a, b in zip(layers, layers[1:]))


def test_loglikelihood_is_the_continuations_summed_loss(checkpoint):
    from lmms_eval.api.instance import Instance

    from vtprune.eval.lmms_model import VtpruneLMM

    docs = {"t": {"test": [{"question": "w7 w8", "cells": [-1] * 15 + [3], "rows": 4, "cols": 4, "cell": 16}]}}

    def request(continuation):
        args = ("w7 w8", continuation, local_tasks.doc_to_visual, 0, "t", "test")
        return Instance(request_type="loglikelihood", arguments=args, idx=0,
                        metadata={"task": "t", "doc_id": 0, "repeats": 1})

    scores = {}
    for method, keep in (("dense", None), ("random", 1.0), ("random", 8)):
        lm = VtpruneLMM(pretrained=str(checkpoint), method=method, **({"keep": keep} if keep is not None else {}))
        lm.task_dict = docs
        scores[method, keep] = [r.text for r in lm.loglikelihood([request(" w9 w10"), request(" w11")])]
        if method == "dense":
            # by hand: the unwrapped model's log-softmax at the positions that predict the continuation
            prompt = lm._encode([lm._prompt("w7 w8", [render(docs["t"]["test"][0])])], [render(docs["t"]["test"][0])])
            lm.close()
            target = torch.tensor([[9, 10]])
            ids = torch.cat([prompt["input_ids"], target], 1)
            with torch.no_grad():
                logits = lm.model(input_ids=ids, pixel_values=prompt["pixel_values"]).logits[0]
            start = prompt["input_ids"].shape[1]
            by_hand = -torch.log_softmax(logits[start - 1 : start + 1], -1)[[0, 1], [9, 10]].sum()
            assert scores[method, keep][0][0] == pytest.approx(float(by_hand), rel=1e-5)
        else:
            lm.close()
    losses = {point: [loss for loss, _ in pairs] for point, pairs in scores.items()}
    assert losses["random", 1.0] == pytest.approx(losses["dense", None], rel=1e-5)  # keeping all is the dense model
    assert losses["random", 8] != pytest.approx(losses["dense", None], rel=1e-3)  # pruning changes what it sees
    assert all(loss > 0 for loss in losses["random", 8])


def test_multiple_choice_task_picks_the_lower_loss(checkpoint):
    from vtprune.eval.lmms_model import VtpruneLMM

    progress = []
    lm = VtpruneLMM(pretrained=str(checkpoint), method="random", keep=16, on_progress=lambda *p: progress.append(p))
    output = _evaluate(lm, ["vtprune_digits_yesno"], 6)
    lm.close()
    cost = lm.cost_summary()
    assert cost["documents"] == 6 and cost["forwards"] == 12  # two scored choices per document, counted apart
    assert progress[0] == (0, 12) and progress[-1] == (12, 12)  # one step per scored request
    accuracy = output["results"]["vtprune_digits_yesno"]["acc,none"]
    samples = output["samples"]["vtprune_digits_yesno"]
    by_hand = []
    for sample in samples:
        losses = [resp[0][0] for resp in sample["resps"]]  # one (loss, greedy) per choice: yes, no
        by_hand.append(float(["yes", "no"][losses.index(min(losses))] == sample["target"]))
    assert accuracy == pytest.approx(sum(by_hand) / len(by_hand))


def test_model_args_errors_name_the_argument(checkpoint):
    from vtprune.eval.lmms_model import VtpruneLMM

    with pytest.raises(ValueError, match="pretrained is required"):
        VtpruneLMM()
    with pytest.raises(ValueError, match="needs keep"):
        VtpruneLMM(pretrained=str(checkpoint), method="fastv")
    with pytest.raises(ValueError, match="only apply to pruning methods"):
        VtpruneLMM(pretrained=str(checkpoint), keep=8)
    with pytest.raises(ValueError, match="unknown method"):
        VtpruneLMM(pretrained=str(checkpoint), method="nope", keep=8)
    with pytest.raises(ValueError, match="has no processor"):
        VtpruneLMM(pretrained="tiny:llava_next")


# -- sweeps --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", ""], "the grid is empty"),
        (["--keep", "0"], "keep must be"),
        (["--keep", "1.5"], "must lie in (0, 1]"),
        (["--model", "/no/such/checkpoint"], "no checkpoint folder at"),
        (["--tasks", "no_such_task"], "unknown lmms-eval task"),
    ],
)
def test_sweep_rejects_bad_arguments_before_any_work(tmp_path, args, message):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--model", "tiny:llava", "--methods", "fastv", "--keep", "8",
                                 "--out", str(out), *args])  # fmt: skip
    assert result.exit_code != 0 and message in _text(result.output), result.output
    assert not (out / "results.jsonl").exists()


def test_results_file_survives_a_torn_line(tmp_path):
    append_result(tmp_path, {"method": "dense", "keep": None, "metrics": {}})
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"method": "fastv", "ke')  # a kill in the middle of a write
    append_result(tmp_path, {"method": "random", "keep": 8, "metrics": {}})
    with pytest.warns(UserWarning, match=r"results.jsonl:2: not JSON .* skipped"):
        assert [row["method"] for row in read_results(tmp_path)] == ["dense", "random"]


def test_hand_written_results_lines_are_named_and_skipped_not_fatal(tmp_path):
    append_result(tmp_path, {"method": "random", "keep": 8, "metrics": {"pope": {"acc": 0.5}}, "setup": {}})
    append_result(tmp_path, {"method": "fastv"})  # appended by hand: no metrics
    append_result(tmp_path, ["not", "a", "row"])
    with pytest.warns(UserWarning) as caught:
        rows = read_results(tmp_path)
    assert [row["method"] for row in rows] == ["random"]
    messages = [str(w.message) for w in caught]
    assert any("results.jsonl:2: not a sweep result" in m for m in messages)
    assert any("results.jsonl:3: not a sweep result" in m for m in messages)


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.7), (4.0, 0.9), (0.5, 0.1)]
    assert pareto_front(points) == [(0.5, 0.1), (1.0, 0.5), (2.0, 0.7), (4.0, 0.9)]


def _sweep_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vtprune.cli", "sweep", "--model", "tiny:llava", "--methods", "fastv,random",
            "--keep", "32,16,8", "--tasks", "vtprune_digits,vtprune_digits_yesno", "--limit", "6", "--out", str(out),
            *extra]  # fmt: skip


def test_sweep_killed_mid_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "sweep"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(_sweep_command(out), cwd=ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not results.exists() or len(read_results(out)) < 2):
        assert process.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = results.read_text().splitlines()
    finished = read_results(out)
    assert 2 <= len(finished) < 7
    rerun = subprocess.run(_sweep_command(out), cwd=ROOT, env=environment, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(finished)} of 7 points already in" in _text(rerun.stdout)
    rows = read_results(out)
    keys = [(row["method"], row["keep"]) for row in rows]
    assert sorted(keys, key=str) == sorted([("dense", None)] + [(m, k) for m in ("fastv", "random") for k in (32, 16, 8)], key=str)
    assert len(set(keys)) == len(keys) == 7
    assert results.read_text().splitlines()[: len(before)] == before  # finished lines were never rewritten
    again = subprocess.run(_sweep_command(out), cwd=ROOT, env=environment, capture_output=True, text=True)
    assert "7 of 7 points already in" in _text(again.stdout) and len(read_results(out)) == 7
    assert (out / "summary.csv").exists() and (out / "pareto.png").exists()
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 0 and "vtprune_digits_yesno" in result.output


def test_sweep_on_ray_matches_the_sweep_in_process(tmp_path):
    pytest.importorskip("ray")
    from vtprune.eval.sweep import run_sweep

    spec = dict(model="tiny:llava", methods=["fastv", "random"], keeps=[16], tasks=["vtprune_digits_yesno"], limit=4)
    here = run_sweep(SweepSpec(**spec, out_dir=str(tmp_path / "here")))
    try:
        remote = run_sweep(SweepSpec(**spec, out_dir=str(tmp_path / "ray")), ray=True, ray_workers=2)
    finally:
        import ray

        ray.shutdown()

    def by_point(rows):
        return {(r["method"], r["keep"]): (r["metrics"], r["cost"]["tflops_prefill"]) for r in rows}

    assert by_point(remote) == by_point(here) and len(remote) == 3


def test_tasks_command_writes_yamls_that_point_at_the_shipped_data(tmp_path):
    result = runner.invoke(app, ["tasks", "--dir", str(tmp_path)])
    assert result.exit_code == 0 and str(tmp_path) in result.output
    for name, data in local_tasks.DATA_FILES.items():
        text = (tmp_path / f"{name}.yaml").read_text()
        assert f"task: {name}" in text and json.dumps(str(data)) in text and data.exists()
