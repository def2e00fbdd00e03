"""DyVTE: trained exit gates; every visual token of a sample leaves after the first layer whose gate fires."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText, AutoProcessor

import vtprune
from vtprune.core.budget import tokens_to_keep
from vtprune.core.layout import VisualItem
from vtprune.core.registry import ModelInfo
from vtprune.core.weights import WEIGHTS_FILE, load_weights, save_weights
from vtprune.embedded import model_dir, trained_dir
from vtprune.embedded.train import prompt_batch
from vtprune.methods.dyvte import DyVTE, ExitGates, cap_layer, exit_features
from vtprune.train.common import evaluate, held_out_docs

SHIPPED = trained_dir("dyvte") / WEIGHTS_FILE


@pytest.fixture(scope="module")
def embedded():
    model = AutoModelForImageTextToText.from_pretrained(model_dir()).eval()
    return model, AutoProcessor.from_pretrained(model_dir())


def prompts(processor, docs):
    return prompt_batch(processor, docs)[0]


def test_gate_input_is_the_mean_text_after_the_image_and_the_last_token():
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float).reshape(2, 6, 2)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # left padding in row 0
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    features = exit_features(hidden, valid, visual)
    # row 0: text after the image = slots 3, 4 (5 is the last token); row 1: slots 1..4
    assert_close(features[0], torch.cat([hidden[0, 3:5].mean(0), hidden[0, 5]]))
    assert_close(features[1], torch.cat([hidden[1, 1:5].mean(0), hidden[1, 5]]))


def test_keep_caps_the_layer_average_of_visual_tokens():
    item = VisualItem(0, 0, "image", 64, 0, ())
    assert cap_layer(1.0, item, 8) == cap_layer(64, item, 8) == 8  # every token: the gates alone decide
    assert cap_layer(32, item, 8) == 4 and cap_layer(0.25, item, 8) == 2
    assert cap_layer(4, item, 8) == 1  # below n / L the exit after layer 0 is the floor
    for keep in (32, 16, 8):
        assert 64 * cap_layer(keep, item, 8) / 8 <= tokens_to_keep(keep, 64)


def test_samples_exit_after_the_first_layer_whose_gate_fires_each_at_its_own_layer(embedded):
    """The defining rule, checked against the gates evaluated by hand on the dense model's states; a batch whose
    samples exit at different layers equals each sample run with its own static exit."""
    model, processor = embedded
    docs = held_out_docs(16)
    inputs = prompts(processor, docs)
    gates = ExitGates.from_meta(load_weights("dyvte", SHIPPED)[1])
    gates.load_state_dict(load_weights("dyvte", SHIPPED)[0])
    with torch.no_grad():
        dense = model(**inputs, output_hidden_states=True)
        valid, visual = inputs["attention_mask"].bool(), inputs["input_ids"] == model.config.image_token_id
        expected = []
        for row in range(len(docs)):
            fired = [k + 1 for k in range(7) if gates(k, exit_features(dense.hidden_states[k + 1], valid, visual))
                     [row].softmax(-1)[1] > 0.5]  # fmt: skip
            expected.append(fired[0] if fired else None)
        with vtprune.wrap(model, "dyvte", 1.0) as handle:
            batch = model(**inputs).logits[:, -1]
            exits = handle.last.exit_layers()
        assert exits == expected
        assert len({e for e in exits}) > 1  # the shipped gates decide per sample
        for row, layer in enumerate(exits):
            single = {k: v[row : row + 1] for k, v in inputs.items()}
            single = {k: (v[:, -int(single["attention_mask"].sum()):] if v.ndim == 2 else v) for k, v in single.items()}
            if layer is None:
                alone = model(**single).logits[:, -1]
            else:
                with vtprune.wrap(model, "dyvte", 1.0, layer=layer):
                    alone = model(**single).logits[:, -1]
            assert_close(batch[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_threshold_one_is_the_dense_model_and_zero_exits_after_layer_0(embedded):
    model, processor = embedded
    inputs = prompts(processor, held_out_docs(6))
    with torch.no_grad():
        dense = model(**inputs).logits[:, -1]
        with vtprune.wrap(model, "dyvte", 1.0, threshold=1.0) as handle:
            assert_close(model(**inputs).logits[:, -1], dense)
            assert handle.last.exit_layers() == [None] * 6
        with vtprune.wrap(model, "dyvte", 1.0, threshold=0.0) as handle:
            model(**inputs)
            assert handle.last.exit_layers() == [1] * 6


def test_keep_forces_the_exit_by_its_cap_layer(embedded):
    model, processor = embedded
    inputs = prompts(processor, held_out_docs(8))
    with torch.no_grad(), vtprune.wrap(model, "dyvte", 16) as handle:
        model(**inputs)
        exits = handle.last.exit_layers()
    assert all(e is not None and e <= 2 for e in exits)  # 16 of 64 tokens on 8 layers: out by layer 2


def test_weights_round_trip_and_errors(embedded, tmp_path):
    model, processor = embedded
    tensors, meta = load_weights("dyvte", SHIPPED)
    path = save_weights(tmp_path / "copy", tensors, meta)
    inputs = prompts(processor, held_out_docs(8))
    with torch.no_grad():
        with vtprune.wrap(model, "dyvte", 1.0) as handle:
            shipped = model(**inputs).logits[:, -1], handle.last.exit_layers()
        with vtprune.wrap(model, "dyvte", 1.0, weights=str(path.parent)) as handle:
            assert_close(model(**inputs).logits[:, -1], shipped[0])
            assert handle.last.exit_layers() == shipped[1]
    with pytest.raises(FileNotFoundError, match="weights='/nowhere/x.safetensors' does not exist"):
        vtprune.wrap(model, "dyvte", 1.0, weights="/nowhere/x.safetensors")
    other = ModelInfo(family="llava", num_layers=8, has_cls_token=True, mrope=False, hidden_size=64)
    with pytest.raises(ValueError, match="trained on the embedded digits LLaVA .* 8 layers of width 64"):
        DyVTE().stages(other, 1.0)
    with pytest.raises(ValueError, match=r"threshold .* must lie in \[0, 1\], got 1.5"):
        DyVTE(threshold=1.5)
    with pytest.raises(ValueError, match=r"layer=8 is outside the model.*\[1, 7\]"):
        vtprune.wrap(model, "dyvte", 1.0, layer=8)


def test_shipped_gates_reproduce_their_training_record(embedded):
    model, processor = embedded
    record = json.loads((SHIPPED.parent / "training.json").read_text())
    figures = evaluate(model, processor, held_out_docs(record["eval_docs"]), "dyvte", 1.0)
    recorded = record["held_out"]["dyvte keep=1.0"]
    assert abs(figures["accuracy"]["mean over types"] - recorded["accuracy"]["mean over types"]) <= 0.02
    assert abs(figures["visual_tokens_per_layer"] - recorded["visual_tokens_per_layer"]) <= 1.0
    # the trade-off the paper claims: close to dense accuracy with far fewer visual tokens per layer
    dense = record["held_out"]["dense"]["accuracy"]["mean over types"]
    assert recorded["accuracy"]["mean over types"] >= dense - 0.03 and recorded["visual_tokens_per_layer"] <= 40


def test_a_few_training_steps_write_loadable_gates(embedded, tmp_path):
    from vtprune.train.dyvte import train

    record = train(docs=4, steps=3, out=tmp_path, eval_docs=0)
    assert record["steps"] == 3 and (tmp_path / "training.json").exists()
    model, processor = embedded
    with torch.no_grad(), vtprune.wrap(model, "dyvte", 1.0, weights=str(tmp_path / "model.safetensors")) as handle:
        model(**prompts(processor, held_out_docs(2)))
        assert len(handle.last.exit_layers()) == 2
