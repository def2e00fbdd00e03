"""The embedded digits model: the shipped weights load offline and answer held-out questions, pruning costs them
accuracy, and the training recipe runs (a few steps; CI never retrains)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtprune
from vtprune.data.digit_grids import (
    QUESTION_TYPES,
    _digits,
    generate,
    normalise_answer,
    render,
)
from vtprune.embedded import model_dir
from vtprune.embedded.train import (
    IMAGE_TOKENS,
    answer_accuracy,
    batch_for,
    build_model,
    build_processor,
    dialogue_batch,
    drop_image_tokens,
    patch_targets,
    prompt_text,
    train,
)


@pytest.fixture(scope="module")
def shipped():
    path = model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def held_out():
    return generate("test", 200, seed=1000)  # the split's documents are never seen in training


def test_shipped_checkpoint_is_an_8_layer_llava_with_cls_and_64_visual_tokens(shipped):
    model, processor = shipped
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == IMAGE_TOKENS == 64
    assert model.config.vision_feature_select_strategy == "default"  # [CLS] exists in the tower and is dropped
    assert processor.num_additional_image_tokens == 1
    record = json.loads((model_dir() / "training.json").read_text())
    assert model.config.text_config.num_hidden_layers == record["text_layers"] == 8
    assert record["steps"] > record["symbolic_steps"] > 0 and record["held_out_accuracy"]["mean over types"] >= 0.90


@pytest.fixture(scope="module")
def dense(shipped, held_out):
    model, processor = shipped
    return answer_accuracy(model, processor, held_out)


def pruned_accuracy(shipped, held_out, method: str, keep: int, **options) -> float:
    model, processor = shipped
    with vtprune.wrap(model, method, keep=keep, **options):
        return answer_accuracy(model, processor, held_out)["mean over types"]


def test_shipped_model_answers_held_out_questions(shipped, held_out, dense):
    model, processor = shipped
    # issue 22's bar: 0.90 averaged over question types, none below 0.75 (chance is ~0.28: cell 1/10, left 1/10,
    # exists 1/2, count's most common answer ~0.4)
    assert dense["mean over types"] >= 0.90 and min(dense[kind] for kind in QUESTION_TYPES) >= 0.75, dense
    # generate() through the processor's chat template says the same words
    docs = held_out[:8]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=[prompt_text(processor, d["question"]) for d in docs], images=[render(d) for d in docs],
                       return_tensors="pt", padding=True)  # fmt: skip
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(answers) == len(docs) and all(normalise_answer(a) for a in answers), answers
    first_tokens = model(**inputs).logits[:, -1].argmax(-1)
    said = [normalise_answer(w) for w in processor.batch_decode(first_tokens[:, None])]
    assert [normalise_answer(a) for a in answers] == said  # generate's first word is the scored one


@pytest.fixture(scope="module")
def random_at(shipped, held_out):
    return {keep: pruned_accuracy(shipped, held_out, "random", keep, seed=0) for keep in (32, 16, 8, 4)}


def test_random_pruning_costs_accuracy_as_the_budget_shrinks(dense, random_at):
    curve = [dense["mean over types"], *random_at.values()]
    # issue 22's bars: non-increasing within 0.02 (noise at 200 documents), and 1/8 of the tokens costs >= 15 points
    assert all(smaller <= larger + 0.02 for larger, smaller in zip(curve, curve[1:])), curve
    assert curve[0] - curve[3] >= 0.15, curve


GUIDED = "fastv"  # the question-guided method every user compares against


def test_a_guided_method_beats_random_at_an_eighth(shipped, held_out, random_at):
    guided_at_8 = pruned_accuracy(shipped, held_out, GUIDED, 8)
    assert guided_at_8 - random_at[8] >= 0.10, (guided_at_8, random_at[8])  # issue 22's bar


def test_fastv_at_a_sixteenth_costs_accuracy(shipped, held_out, dense):
    # the LLM still reads the image after layer 2 (a cell question's place is parsed by then), so pruning there
    # by layer 1's attention is not free, as on real models
    fastv_at_4 = pruned_accuracy(shipped, held_out, "fastv", 4)
    assert dense["mean over types"] - fastv_at_4 >= 0.05, (dense, fastv_at_4)  # issue 22's bar


def test_every_image_method_applies_to_the_shipped_model():
    from vtprune.demo import applicable_methods

    _, skipped = applicable_methods(keep=4)
    # deep enough for every default schedule: only video methods and Qwen's downsample are left out
    too_shallow = {m: why for m, why in skipped.items() if "takes no video input" not in why and m != "downsample"}
    assert not too_shallow, too_shallow


def test_dialogue_batch_first_turn_is_the_evaluation_prompt():
    processor = build_processor()
    docs = generate("train", 2, seed=3)
    batch = dialogue_batch(processor, docs, turns=3, rng=random.Random(0), read_share=0.5)
    single = batch_for(processor, docs)
    for row in range(2):
        length = int(single["attention_mask"][row].sum())
        assert torch.equal(batch["input_ids"][row, :length], single["input_ids"][row, :length])
        assert torch.equal(batch["labels"][row, :length], single["labels"][row, :length])
    assert (batch["labels"] != -100).sum() > (single["labels"] != -100).sum()  # later turns are supervised too


def test_patch_targets_on_a_hand_made_grid():
    _, digits = _digits()
    scan = {d: int((digits == d).nonzero()[0][0]) for d in (3, 5)}
    cells = [-1] * 16
    cells[0], cells[1], cells[3], cells[5] = scan[3], scan[5], scan[3], scan[3]  # row one: 3 5 _ 3, row two: _ 3
    targets = patch_targets([{"cells": cells}])
    per_cell = {name: targets[name][0].reshape(4, 2, 4, 2)[:, 0, :, 0].flatten().tolist()
                for name in ("cell", "count", "left", "row", "col")}  # fmt: skip
    assert per_cell["cell"][:8] == [3, 5, 10, 3, 10, 3, 10, 10] and set(per_cell["cell"][8:]) == {10}
    assert per_cell["count"][:8] == [3, 1, 0, 3, 0, 3, 0, 0]  # three 3s; empty cells count nothing
    assert per_cell["left"][:8] == [10, 3, 5, 10, 10, 10, 3, 10]  # the edge and empty cells have no digit left
    assert per_cell["row"][:8] == [0] * 4 + [1] * 4 and per_cell["col"][:8] == [0, 1, 2, 3] * 2
    assert targets["presence"][0].nonzero().flatten().tolist() == [3, 5]
    # the 2 x 2 patches of a cell share its targets
    assert torch.equal(targets["count"][0].reshape(8, 8)[:2, :2], torch.full((2, 2), 3))


def test_tokenizer_names_the_counted_digit_with_the_digit_token():
    tokenizer = build_processor().tokenizer
    assert tokenizer.tokenize("how many 7s are there ?")[2:4] == ["7", "s"]
    assert tokenizer.tokenize("what digit is in row two column three ?")[5:8] == ["two", "column", "three"]
    assert tokenizer.unk_token_id not in tokenizer("which digit is left of the 10 ?")["input_ids"]


def test_dropping_image_tokens_keeps_text_labels_and_positions():
    processor = build_processor()
    model = build_model(len(processor.tokenizer)).eval()
    docs = generate("train", 3, seed=5)
    inputs = dialogue_batch(processor, docs, turns=2, rng=random.Random(0), read_share=0.0)
    is_image = inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = torch.cat(list(getattr(features, "pooler_output", features)))
    embeds = model.get_input_embeddings()(inputs["input_ids"]).masked_scatter(is_image[..., None], features)
    # nothing dropped: exactly LLaVA's own forward
    untouched = drop_image_tokens(embeds, inputs, is_image, random.Random(0), share=0.0)
    torch.testing.assert_close(model(**untouched).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)
    dropped = drop_image_tokens(embeds, inputs, is_image, random.Random(0), share=1.0)
    for row in range(len(docs)):
        real = dropped["attention_mask"][row].bool()
        text = int((inputs["attention_mask"][row].bool() & ~is_image[row]).sum())
        assert 2 <= int(real.sum()) - text <= IMAGE_TOKENS - 1  # some, never all, image tokens stay
        positions = dropped["position_ids"][row, real]
        assert bool((positions[1:] > positions[:-1]).all())  # original numbering, gaps where tokens left
        original = inputs["labels"][row][inputs["labels"][row] != -100]
        assert torch.equal(dropped["labels"][row][dropped["labels"][row] != -100], original)
        last = int(inputs["attention_mask"][row].sum()) - 1
        assert int(positions[-1]) == last  # the text after the image keeps its positions
    # renumbered: the same tokens, numbered 0..n-1 with the gaps closed (as methods with closed positions do)
    closed = drop_image_tokens(embeds, inputs, is_image, random.Random(0), share=1.0, renumber=1.0)
    for row in range(len(docs)):
        real = closed["attention_mask"][row].bool()
        assert int(real.sum()) < int(inputs["attention_mask"][row].sum())
        assert torch.equal(closed["position_ids"][row, real], torch.arange(int(real.sum())))
        original = inputs["labels"][row][inputs["labels"][row] != -100]
        assert torch.equal(closed["labels"][row][closed["labels"][row] != -100], original)


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path):
    with torch.enable_grad():  # the suite runs without autograd (conftest); training needs it
        _, _, scores = train(2, tmp_path / "ckpt", batch_size=2, turns=2, eval_docs=8, log_every=0,
                             symbolic_steps=1, tower_steps=2)  # fmt: skip
    assert set(scores) >= {"cell", "count", "exists", "left", "mean over types"}
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    processor = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert json.loads((tmp_path / "ckpt" / "training.json").read_text())["steps"] == 2


def test_training_is_seeded():
    first = build_model(40, seed=7).state_dict()
    second = build_model(40, seed=7).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
