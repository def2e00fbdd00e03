"""The engine's parts on their own: the hook set, the stage runner on a hand-made prefill (no model), the vision
observer's notes."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, make_batch, tiny_model
from vtprune.core.engine.hooks import HookSet
from vtprune.core.engine.stages import StageRunner
from vtprune.core.engine.state import Prefill
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import ModelInfo, Stage


def test_hook_set_removes_every_hook_and_patch():
    module = nn.Linear(2, 2)
    calls = []
    with HookSet() as hooks:
        hooks.add(module.register_forward_hook(lambda m, a, o: calls.append("hook")))
        hooks.patch(module, "extra_repr", lambda: "patched")
        assert len(hooks) == 2 and module.extra_repr() == "patched"
        module(torch.zeros(1, 2))
    module(torch.zeros(1, 2))
    assert calls == ["hook"]  # the hook ran once, inside the block
    assert module.extra_repr() == nn.Linear.extra_repr(module)  # the class's method shows through again
    assert not module._forward_hooks


class _KeepLargestFirstFeature(vtprune.Method):
    """A hand-made method: the tokens whose first feature is largest."""

    name = "largest_first_feature"

    def stages(self, model, keep):
        return [Stage(layer=None)]

    def score(self, ctx):
        return [view.features[:, 0] for view in ctx.items]


def _prefill(features: list[torch.Tensor], text_before: int, budget: int) -> Prefill:
    """One sample: ``text_before`` text slots, then the items back to back, one text slot after."""
    counts = [f.shape[0] for f in features]
    length = text_before + sum(counts) + 1
    item_of_slot = torch.full((1, length), -1)
    token_of_slot = torch.full((1, length), -1)
    items, start = [], text_before
    for index, count in enumerate(counts):
        item_of_slot[0, start : start + count] = index
        token_of_slot[0, start : start + count] = torch.arange(count)
        items.append(VisualItem(index, 0, "image", count, start - text_before))
        start += count
    layout = Layout(
        token=torch.arange(length)[None],
        valid=torch.ones(1, length, dtype=torch.bool),
        item=item_of_slot,
        item_token=token_of_slot,
        positions=torch.arange(length)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )
    return Prefill(
        layout=layout,
        cache=None,
        record=ForwardRecord(items=[], item_grids=[], input_length=length, budget="final"),
        items=items,
        features=dict(enumerate(features)),
        budgets={i: [{-1: budget}] for i in range(len(features))},
        segments=[layout],
    )


def test_stage_runner_selects_records_and_keeps_text_without_a_model():
    adapter = SimpleNamespace(vlm=SimpleNamespace(get_input_embeddings=lambda: nn.Embedding(4, 3)))
    info = ModelInfo(family="hand-made", num_layers=4, has_cls_token=False, mrope=False)
    runner = StageRunner(adapter, _KeepLargestFirstFeature(), info)
    first = torch.tensor([[0.1], [0.9], [0.5], [0.7]]).expand(4, 3).contiguous()
    second = torch.tensor([[0.3], [0.2], [0.8]]).expand(3, 3).contiguous()
    current = _prefill([first, second], text_before=2, budget=2)
    keep = runner.run(current, 0, Stage(layer=None))
    # text slots 0, 1 and 9 stay; image 0 (slots 2-5) keeps tokens 1 and 3, image 1 (slots 6-8) tokens 0 and 2
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 1, 3, 5, 6, 8, 9]
    stage = current.record.stages[0]
    assert [k.tolist() for k in stage.kept_per_item] == [[1, 3], [0, 2]]
    assert stage.kept[0].tolist() == [1, 3, 4, 6]  # per sample, in visual-token numbering across its images
    # replaying a frozen record reproduces the selection whatever the method would say now
    runner.frozen = current.record
    again = _prefill([first.flip(0), second.flip(0)], text_before=2, budget=2)
    assert torch.equal(runner.run(again, 0, Stage(layer=None)), keep)


def test_observer_notes_each_image_of_a_generate_call_by_its_features():
    model = tiny_model("llava")
    batch = make_batch(model, [[2, Image(), 2], [3, Image(), 1]])
    with vtprune.wrap(model, "vtc_cls", keep=4) as pruning:
        observer = pruning._engine.observer
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        notes = [observer.lookup(f) for f in features]
        assert all(n is not None and n.signals is not None for n in notes)
        assert observer.lookup(features[0].clone()) is None  # another tensor with the same values is not the image
    assert observer.lookup(features[0]) is None  # unwrap forgets everything


def test_in_llm_stages_refuse_layers_whose_inputs_cannot_be_rebuilt():
    from vtprune.api import checked_stages

    hybrid = ModelInfo(
        family="hand-made", num_layers=6, has_cls_token=False, mrope=False,
        layer_types=("linear_attention", "full_attention", "sliding_attention", "full_attention",
                     "chunked_attention", "full_attention"),
    )  # fmt: skip
    fastv = vtprune.FastV(layer=3)
    # Llama 4's chunked attention has no mask builder in vtprune yet; linear attention has (its 2-D padding mask)
    with pytest.raises(ValueError, match=r"from 3 on include chunked_attention layers.*prune before the LLM"):
        checked_stages(fastv, [Stage(layer=3, attention_from=2)], hybrid)
    attention_only = ModelInfo(
        family="hand-made", num_layers=4, has_cls_token=False, mrope=False,
        layer_types=("linear_attention", "full_attention", "sliding_attention", "full_attention"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"attention_from=0 is a linear_attention layer.*before 2: \[1, 2\]"):
        checked_stages(fastv, [Stage(layer=2, attention_from=0)], attention_only)
    assert checked_stages(fastv, [Stage(layer=2, attention_from=1)], attention_only)
    assert checked_stages(fastv, [Stage(layer=0, attention_from=None)], attention_only)  # linear layers after it
    assert checked_stages(fastv, [Stage(layer=None)], hybrid)  # before the LLM: every layer sees fewer tokens


def test_encoder_outputs_in_list_or_flat_tensor_layout():
    from vtprune.core.adapter import Adapter

    rows = [torch.randn(3, 4), torch.randn(5, 4)]

    class FlatAdapter(Adapter):
        encoder_output_layout = "tensor"

        def __init__(self) -> None:  # no model needed for the layout
            pass

    class ListAdapter(FlatAdapter):
        encoder_output_layout = "list"

    flat = FlatAdapter().encoder_outputs({"image": rows})["image"].pooler_output
    assert torch.equal(flat, torch.cat(rows))
    listed = ListAdapter().encoder_outputs({"image": rows})["image"].pooler_output
    assert all(torch.equal(a, b) for a, b in zip(listed, rows))
    for layout in (listed, flat, torch.stack([rows[0], rows[0]])):
        counts = [3, 5] if layout is not listed and layout.ndim == 2 else None
        images = Adapter.per_image_features(layout, counts)
        assert [tuple(i.shape) for i in images] in ([(3, 4), (5, 4)], [(3, 4), (3, 4)])
    with pytest.raises(ValueError, match="needs the tokens of each image"):
        Adapter.per_image_features(flat, [3, 4])


def test_per_row_encoder_extras_follow_the_kept_rows(monkeypatch):
    """Extra per-row encoder outputs (Qwen3-VL's deepstack features) reach the forward sliced like the features."""
    import vtprune.adapters
    from vtprune.adapters.llava import LlavaAdapter

    class DeepstackLlava(LlavaAdapter):
        def encode(self, inputs):
            chunks = super().encode(inputs)
            for chunk in chunks:  # two "deepstack layers" whose rows are recognisable multiples of the features
                chunk.extras = {"deepstack_features": [chunk.features * 2, chunk.features * 3]}
            return chunks

    monkeypatch.setattr(vtprune.adapters, "ADAPTERS", (DeepstackLlava, *vtprune.adapters.ADAPTERS))
    model = tiny_model("llava")
    batch = make_batch(model, [[2, Image(), 3, Image(), 1], [4, Image(), 2]])
    seen = {}
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs["mm_encoder_outputs"]), with_kwargs=True
    )
    try:
        with vtprune.wrap(model, "random", keep=5, seed=1):
            model(**batch)
    finally:
        handle.remove()
    output = seen["image"]
    assert [rows.shape[0] for rows in output.pooler_output] == [5, 5, 5]
    for layer, factor in enumerate((2, 3)):
        per_image = output.deepstack_features[layer]
        assert isinstance(per_image, tuple) and len(per_image) == 3
        for rows, kept in zip(per_image, output.pooler_output):
            assert_close(rows, kept * factor)


def test_a_budget_above_an_image_warns_once_and_the_record_says_what_was_kept():
    model = tiny_model("llava")
    batch = make_batch(model, [[2, Image(), 3]])
    tokens = int((batch["input_ids"] == vtprune.testing.IMAGE_TOKEN).sum())
    with vtprune.wrap(model, "random", keep=500) as pruning:
        with pytest.warns(UserWarning, match=rf"keep=500 is at least the {tokens} tokens of 1 of the 1 images"):
            model(**batch)
        assert pruning.last.stages[0].budgets == [tokens]  # what was kept, not what was asked
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**batch)  # once per wrap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vtprune.wrap(model, "random", keep=4):
            model(**batch)  # a budget that prunes says nothing
