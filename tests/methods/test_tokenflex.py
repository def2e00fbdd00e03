"""TokenFLEX: a SwiGLU over adaptive average pooling, trained for every count; its weights load, check the model
and reproduce their training figures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText, AutoProcessor

import vtprune
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import GridPart, VisualItem
from vtprune.core.registry import Merged, ModelInfo, Stage
from vtprune.core.weights import save_weights
from vtprune.embedded import model_dir, trained_dir
from vtprune.embedded.train import prompt_batch
from vtprune.methods.tokenflex import (
    FlexProjector,
    TokenFLEX,
    cell_corners,
    flex_shape,
)
from vtprune.train.common import evaluate, held_out_docs
from vtprune.train.tokenflex import flex_inputs, tower_grid, train

from .common import single_item_layout

LLAVA_8 = ModelInfo(family="llava", num_layers=8, has_cls_token=True, mrope=False, hidden_size=192)


@pytest.fixture(scope="module")
def embedded():
    path = model_dir()
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def flex_file(tmp_path_factory):
    """A seeded, untrained flex projector for the embedded LLaVA and its weights file."""
    torch.manual_seed(0)
    flex = FlexProjector(128, 64, 192).eval()
    meta = {"method": "tokenflex", "hidden_size": 192, "num_layers": 8, "trained_on": "test", **flex.meta}
    return flex, save_weights(tmp_path_factory.mktemp("flex"), flex.state_dict(), meta)


def prompts(processor, docs):
    return prompt_batch(processor, docs)[0]


def test_pooled_features_are_swiglu_of_adaptive_avg_pool(flex_file, tmp_path):
    flex, path = flex_file
    grid = torch.randn(1, 8, 8, 128)
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), (3, 3)).flatten(2)[0].T  # windows overlap: 8 -> 3
    expected = flex.w2(F.silu(flex.w1(pooled)) * flex.w3(pooled))
    assert_close(flex(grid, 3, 3)[0], expected)
    # the method on a hand-made image: budget 9 -> a 3 x 3 grid, each cell on its top-left token
    item = VisualItem(0, 0, "image", 64, 0, (GridPart(0, 8, 8, 8),))
    view = ItemView(item, 0, torch.arange(64), torch.arange(64), torch.ones(64, dtype=torch.bool), 9,
                    encoder_features=grid[0].reshape(64, 128))  # fmt: skip
    ctx = PruneContext(stage=Stage(None, encoder_features=True), model=LLAVA_8, layout=single_item_layout(64),
                       items=[view])  # fmt: skip
    (merged,) = TokenFLEX(weights=str(path)).select(ctx)
    assert isinstance(merged, Merged) and merged.space == "llm"
    assert merged.indices.tolist() == [0, 2, 5, 16, 18, 21, 40, 42, 45]
    assert_close(merged.features, expected)


def test_count_and_grid_for_a_budget():
    assert flex_shape(1.0, 8, 8) == (8, 8) and flex_shape(64, 8, 8) == (8, 8)
    assert flex_shape(0.25, 8, 8) == (4, 4) and flex_shape(16, 8, 8) == (4, 4)
    assert flex_shape(10, 8, 8) == (2, 5)  # the largest product that fits, aspect closest to square
    assert flex_shape(0.1, 8, 8) == (2, 3)  # round(6.4) = 6
    assert flex_shape(1, 8, 8) == (1, 1) and flex_shape(0.001, 8, 8) == (1, 1)
    assert cell_corners(8, 8, 2, 2).tolist() == [0, 4, 32, 36]


def test_saved_weights_give_the_in_memory_module_logits(embedded, flex_file):
    model, processor = embedded
    flex, path = flex_file
    batch = prompts(processor, held_out_docs(1))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    inputs = {**batch, "labels": batch["input_ids"]}
    # the training path: the first 16 placeholders carry the in-memory module's 4 x 4 grid
    memory = model(**{k: v for k, v in flex_inputs(model, flex, inputs, tower_grid(model, batch["pixel_values"]),
                                                   16, image_id).items() if k != "labels"}).logits  # fmt: skip
    with vtprune.wrap(model, "tokenflex", 16, weights=str(path)):
        loaded = model(**batch).logits
    assert loaded.shape == memory.shape
    assert_close(loaded, memory, rtol=1e-5, atol=1e-5)


def test_keep_all_is_the_dense_model_with_the_flex_projector_per_token(embedded, flex_file):
    model, processor = embedded
    flex, path = flex_file
    batch = prompts(processor, held_out_docs(2))
    with vtprune.wrap(model, "tokenflex", 1.0, weights=str(path)):
        wrapped = model(**batch).logits
    original = model.model.multi_modal_projector
    model.model.multi_modal_projector = FlexPerToken(flex)
    try:
        dense = model(**batch).logits
    finally:
        model.model.multi_modal_projector = original
    assert_close(wrapped, dense, rtol=1e-5, atol=1e-5)


class FlexPerToken(torch.nn.Module):
    def __init__(self, flex: FlexProjector) -> None:
        super().__init__()
        self.flex = flex

    def forward(self, features):
        return self.flex.project(features)


def test_batch_equals_each_sample_alone(embedded, flex_file):
    model, processor = embedded
    _, path = flex_file
    docs = held_out_docs(12)
    docs = [docs[0], next(d for d in docs if len(d["question"]) != len(docs[0]["question"]))]  # padding differs
    batch = prompts(processor, docs)
    assert (batch["attention_mask"] == 0).any()
    with vtprune.wrap(model, "tokenflex", 8, weights=str(path)):
        together = model(**batch).logits[:, -1]
        alone = torch.cat([model(**prompts(processor, [d])).logits[:, -1] for d in docs])
    assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_smoke_training_writes_loadable_weights(embedded, tmp_path):
    model, processor = embedded
    record = train(2, seed=1, batch_size=2, turns=2, hidden_width=32, eval_docs=0, log_every=0, out=tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "training.json").is_file()
    with vtprune.wrap(model, "tokenflex", 4, weights=str(tmp_path)) as handle:
        logits = model(**prompts(processor, held_out_docs(1))).logits
    assert torch.isfinite(logits).all() and handle.last.stages[0].kept[0].numel() == 4
    assert record["recipe"]["steps"] == 2


def test_shipped_weights_reproduce_their_held_out_figure(embedded):
    model, processor = embedded
    recorded = json.loads((trained_dir("tokenflex") / "training.json").read_text())["held_out"]
    figure = recorded["tokenflex"]["16"]
    result = evaluate(model, processor, held_out_docs(recorded["documents"]), "tokenflex", 16)
    assert abs(result["accuracy"]["mean over types"] - figure["accuracy"]["mean over types"]) <= 0.02
    assert result["visual_tokens_per_layer"] == figure["visual_tokens_per_layer"] == 16


def test_errors_name_the_path_the_family_and_the_model(embedded, flex_file, tmp_path):
    model, _ = embedded
    _, path = flex_file
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        vtprune.wrap(model, "tokenflex", 16, weights=str(missing))
    qwen = ModelInfo(family="qwen_vl", num_layers=8, has_cls_token=False, mrope=True, family_name="Qwen2-VL",
                     per_token_projector=False, hidden_size=192)  # fmt: skip
    with pytest.raises(ValueError, match="tokenflex: .*Qwen2-VL's projector combines several patches"):
        TokenFLEX(weights=str(path)).stages(qwen, 16)
    wider = ModelInfo(family="llava", num_layers=8, has_cls_token=True, mrope=False, hidden_size=256)
    with pytest.raises(ValueError, match="trained on test .*8-layer language model of width 192.*width 256"):
        TokenFLEX(weights=str(path)).stages(wider, 16)
