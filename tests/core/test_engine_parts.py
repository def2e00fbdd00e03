"""The engine's parts on their own: the hook set, the stage runner on a hand-made prefill (no model), the vision
observer's notes."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

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
