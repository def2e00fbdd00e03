"""The video task ``vtprune_digits_video`` (clips of changing digit grids), videos through vtprune's lmms-eval model,
and ``budget_unit`` in ``vtprune sweep``.

No trained video model exists here (the embedded model is a LLaVA, images only), so the sweep runs on a tiny random
Qwen2-VL saved as a checkpoint folder: these tests check function (tokens kept per point, the unit recorded, resume),
never accuracy.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

import vtprune.methods.evs  # noqa: F401  (registers "evs" where vtprune.methods does not yet)
from vtprune.cli import app
from vtprune.data.digit_grids import labels_of, source_pool
from vtprune.eval import tasks as local_tasks
from vtprune.eval.sweep import SweepSpec, append_result, finished_keys, read_results
from vtprune.eval.tasks import video

TASK = "vtprune_digits_video"
runner = CliRunner()
# the test checkpoint's video processor resizes a 64 x 64 frame to 32 x 32: 16 x 16 patches, 2 x 2 merged -> 64
# tokens per Qwen frame (a temporal pair of raw frames)
TOKENS_PER_PAIR = 64
VIDEO_TEMPLATE = (
    "{% for m in messages %}w4 {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> {% elif c['type'] == 'video' %}"
    "<|vision_start|> <|video_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}w5"
)


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2-VL with a processor that takes videos: small frames and a chat template with a video
    entry (vtprune.testing's tiny processor writes images only)."""
    from transformers import Qwen2VLVideoProcessor

    from vtprune.testing import tiny_model, tiny_processor

    model = tiny_model("qwen2_vl")
    processor = tiny_processor("qwen2_vl", model)
    processor.video_processor = Qwen2VLVideoProcessor(
        patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}
    )  # fmt: skip
    processor.chat_template = VIDEO_TEMPLATE
    folder = tmp_path_factory.mktemp("ckpt") / "qwen2_vl_video"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# -- documents ----------------------------------------------------------------------------------------------------


def _answer(doc: dict) -> str:
    """The right answer worked out again from the frames' labels."""
    shown = [set(labels_of(frame)) - {-1} for frame in doc["frames"]]
    words = doc["question"].split()
    if doc["type"] == "last":
        (new,) = shown[-1] - shown[-2]
        return str(new)
    if doc["type"] == "frames":
        return str(sum(int(words[5]) in s for s in shown))
    digit = int(words[5])
    return str(next(i for i, s in enumerate(shown) if digit in s) + 1)


def test_clips_are_even_change_one_digit_a_frame_and_answers_hold():
    docs = video.video_documents()
    assert docs == video.video_documents() and docs != video.video_documents(seed=4)
    assert {doc["type"] for doc in docs} == set(video.VIDEO_TYPES)
    assert {len(doc["frames"]) for doc in docs} == {4, 6, 8}  # even: whole Qwen temporal pairs
    pool = set(source_pool("test"))
    for doc in docs:
        assert _answer(doc) == doc["answer"], doc["id"]
        for before, after in zip(doc["frames"], doc["frames"][1:]):
            # one digit leaves, one arrives elsewhere, and the arrival's value was not on screen
            gone = [i for i, (a, b) in enumerate(zip(before, after)) if a >= 0 and b < 0]
            came = [i for i, (a, b) in enumerate(zip(before, after)) if a < 0 and b >= 0]
            assert len(gone) == len(came) == 1
            assert set(labels_of(after)) - set(labels_of(before)) == set(labels_of([after[came[0]]]))
        assert all(c < 0 or c in pool for frame in doc["frames"] for c in frame)
    # "first" does not collapse to frame 1
    firsts = [doc["answer"] for doc in docs if doc["type"] == "first"]
    assert firsts.count("1") < len(firsts) / 3


def test_shipped_file_matches_the_generator_and_the_yaml_points_at_it(tmp_path):
    shipped = [json.loads(line) for line in video.DATA_FILE.read_text().splitlines()]
    assert shipped == video.video_documents(), "regenerate with vtprune.eval.tasks.video.write_data_file()"
    assert local_tasks.DATA_FILES[TASK] == video.DATA_FILE
    text = (local_tasks.task_dir(tmp_path) / f"{TASK}.yaml").read_text()
    assert "vtprune.eval.tasks.video.doc_to_visual" in text and json.dumps(str(video.DATA_FILE)) in text


def test_doc_to_visual_is_one_video_of_rendered_frames():
    doc = video.video_documents(1)[0]
    (visual,) = video.doc_to_visual(doc)
    assert visual["type"] == "video" and len(visual["url"]) == len(doc["frames"])
    for frame, cells in zip(visual["url"], doc["frames"]):
        pixels = np.asarray(frame)[..., 0]
        assert frame.mode == "RGB" and pixels.shape == (64, 64)
        for position, source in enumerate(cells):  # ink exactly in the cells this frame fills
            r, c = divmod(position, 4)
            assert (pixels[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].max() > 0) == (source >= 0)
    assert video.process_results(doc, [f" {doc['answer']}."])["accuracy"] == 1.0


# -- the lmms-eval model --------------------------------------------------------------------------------------------


def test_lmms_model_passes_frames_as_one_video(checkpoint):
    from vtprune.eval.lmms_model import VideoInput, VtpruneLMM

    lm = VtpruneLMM(pretrained=str(checkpoint), method="random", keep=16, budget_unit="frame")
    doc = video.video_documents(1)[0]  # 6 raw frames
    visuals = lm._visuals(video.doc_to_visual, doc)
    assert len(visuals) == 1 and isinstance(visuals[0], VideoInput) and len(visuals[0].frames) == 6
    prompt = lm._prompt(doc["question"], visuals)
    assert "<|video_pad|>" in prompt and "<|image_pad|>" not in prompt
    inputs = lm._encode([prompt], visuals)
    assert inputs["video_grid_thw"].tolist() == [[3, 16, 16]] and "pixel_values" not in inputs  # 6 frames: 3 pairs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    record = lm.pruning.last
    assert [item["modality"] for item in record.items] == ["video"] * 3  # frame unit: one budget per pair
    assert [kept.numel() for kept in record.stages[-1].kept_per_item] == [16] * 3
    assert lm.config["budget_unit"] == "frame"
    lm.close()


def test_a_family_without_video_input_is_named():
    from vtprune.eval.lmms_model import VtpruneLMM
    from vtprune.testing import tiny_model, tiny_processor

    model = tiny_model("llava")
    lm = VtpruneLMM(pretrained="tiny:llava", model=model, processor=tiny_processor("llava", model))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration takes no video input"):
        lm._visuals(video.doc_to_visual, video.video_documents(1)[0])
    lm.close()


# -- budget_unit in sweeps --------------------------------------------------------------------------------------------


def test_rows_written_before_budget_unit_resume_as_video(tmp_path):
    spec = SweepSpec(model="tiny:qwen2_vl", methods=["random"], keeps=[8], tasks=[TASK], out_dir=str(tmp_path))
    old = {key: value for key, value in spec.setup().items() if key != "budget_unit"}
    append_result(tmp_path, {"setup": old, "method": "random", "keep": 8, "metrics": {TASK: {"accuracy": 0.0}}})
    assert len(finished_keys(spec)) == 1
    spec.budget_unit = "frame"
    assert len(finished_keys(spec)) == 0  # another unit: another point


def _sweep(checkpoint, out, *extra):
    args = ["sweep", "--model", str(checkpoint), "--tasks", TASK, "--limit", "3", "--out", str(out), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runner.invoke(app, args)


def test_sweep_on_the_video_task_records_tokens_and_units_and_resumes(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    frames = [len(doc["frames"]) // 2 for doc in video.video_documents(3)]  # Qwen frames of the 3 clips: 3, 4, 2
    before = sum(frames) * TOKENS_PER_PAIR / 3
    result = _sweep(checkpoint, out, "--methods", "evs,random", "--keep", "96,32")
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert len(rows) == 5 and {row["setup"]["budget_unit"] for row in rows} == {"video"}
    tokens = {(row["method"], row["keep"]): row["cost"]["sample_visual_tokens"] for row in rows}
    assert all(row["cost"]["sample_visual_tokens_before"] == before for row in rows)
    # per video: random keeps exactly keep; EVS keeps frame 0 whole (64 tokens) at least
    assert tokens == {("dense", None): before, ("evs", 96): 96, ("evs", 32): 64, ("random", 96): 96, ("random", 32): 32}
    assert all(row["cost"]["config"].get("budget_unit", "video") == "video" for row in rows)

    again = _sweep(checkpoint, out, "--methods", "evs,random", "--keep", "96,32")
    assert again.exit_code == 0 and "5 of 5 points already in" in _text(again.output)
    assert len(read_results(out)) == 5

    refused = _sweep(checkpoint, out, "--methods", "evs", "--keep", "32", "--budget-unit", "frame")
    assert refused.exit_code != 0 and "evs accepts budget_unit 'video'" in _text(refused.output)
    bad = _sweep(checkpoint, out, "--methods", "random", "--keep", "32", "--budget-unit", "clip")
    assert bad.exit_code != 0 and "budget_unit must be one of" in _text(bad.output)

    per_frame = _sweep(checkpoint, out, "--methods", "random", "--keep", "32", "--budget-unit", "frame")
    assert per_frame.exit_code == 0, per_frame.output
    rows = read_results(out)
    new = [row for row in rows if row["setup"]["budget_unit"] == "frame"]
    assert len(rows) == 7 and [(row["method"], row["keep"]) for row in new] == [("dense", None), ("random", 32)]
    cost = new[1]["cost"]
    assert cost["visual_tokens"] == 32 and cost["sample_visual_tokens"] == 32 * sum(frames) / 3  # 32 per pair
    assert cost["config"]["budget_unit"] == "frame"
    # the table tells the units apart and shows tokens per sample where a video is several budgeted items
    shown = _text(runner.invoke(app, ["plot", str(out)]).output)
    assert "budget_unit=frame" in shown and "budget_unit=video" in shown and "tokens / sample" in shown
