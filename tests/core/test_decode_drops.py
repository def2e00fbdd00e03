"""Decode-time drops of cached visual tokens (DecodeStage): generation with drops equals a no-cache recomputation
of the full sequence whose dropped tokens are masked for exactly the rows and layers the record says."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model, visual_mask, with_positions
from vtprune.core.record import ForwardRecord
from vtprune.core.registry import DecodeStage, register_method, unregister_method

NO_SPECIAL = {"suppress_tokens": list(range(120, 128)), "pad_token_id": 0}


@dataclass
class _FastVThenDecodeDrops(vtprune.FastV):
    """FastV in prefill, then decode stages ranking cached tokens by the newest token's attention."""

    name = "_fastv_decode_drops"
    decode_layer: int = 1
    decode_keep: float = 0.7
    every: int = 1

    def decode_stages(self, model, keep):
        return [DecodeStage(layer=self.decode_layer, keep=self.decode_keep, every=self.every)]

    def decode_score(self, ctx):
        return ctx.per_item(ctx.attention())


@pytest.fixture(autouse=True)
def _registered():
    register_method(_FastVThenDecodeDrops)
    yield
    unregister_method(_FastVThenDecodeDrops.name)


def masked_recomputation(model, batch: dict, sequences: torch.Tensor, record: ForwardRecord, steps: int) -> list:
    """Last-row logits of the dense model (no cache) on the prompt plus the first ``s`` generated tokens, for each
    ``s < steps``: from each prefill stage's layer on, its dropped visual tokens are hidden from every row; a visual
    token a decode stage dropped during step t is hidden, in every layer, from the rows from step t + 1 on (sequence
    index >= prompt + t). Visual tokens are mapped to columns in their original numbering."""
    prompt = batch["input_ids"].shape[1]
    visual = visual_mask(batch)
    columns = [visual[b].nonzero().squeeze(1) for b in range(visual.shape[0])]
    layers = vtprune.adapter_for(model).decoder_layers
    logits = []
    for step in range(steps):
        length = prompt + step
        hidden = torch.zeros(len(layers), visual.shape[0], length, length, dtype=torch.bool)
        for stage in record.stages:
            for b, kept in enumerate(stage.kept):
                gone = columns[b][~torch.isin(torch.arange(columns[b].numel()), kept)]
                hidden[stage.layer :, b, :, gone] = True
        for drop in record.decode_drops:
            for b, gone in enumerate(drop.dropped):
                hidden[:, b, prompt + drop.step :, columns[b][gone]] = True

        def hook(index, hidden=hidden):
            def hide(module, args, kwargs):
                mask = kwargs["attention_mask"]
                fill = torch.finfo(mask.dtype).min
                kwargs["attention_mask"] = mask.masked_fill(hidden[index][:, None, :, : mask.shape[-1]], fill)
                return args, kwargs

            return hide

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            full = {**batch, "input_ids": sequences[:, :length]}
            extra = length - prompt
            full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(visual.shape[0], extra).long()], 1)
            logits.append(model(**with_positions(model, full), use_cache=False).logits[:, -1])
        finally:
            for handle in handles:
                handle.remove()
    return logits


@pytest.mark.parametrize("decode_layer,every", [(1, 1), (3, 2)])
def test_generation_with_decode_drops_equals_masked_recomputation(decode_layer, every):
    """Batch of two with left padding; drops at a layer before (1) and after (3) FastV's pruning layer 2."""
    model = tiny_model("llava")  # SDPA on our side, eager for the reference's masks
    batch = make_batch(model, samples_for("llava")[:2])
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padding
    steps = 5
    options = {"decode_layer": decode_layer, "every": every}
    with vtprune.wrap(model, _FastVThenDecodeDrops.name, keep=12, **options) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **NO_SPECIAL,
        )  # fmt: skip
        record = pruning.last
    model.set_attn_implementation("eager")
    expected_steps = [t for t in range(1, steps) if t % every == 0]
    assert [drop.step for drop in record.decode_drops] == expected_steps
    for drop in record.decode_drops:
        assert all(gone.numel() > 0 for gone in drop.dropped)
    reference = masked_recomputation(model, batch, generated.sequences, record, steps)
    for step in range(steps):
        assert_close(generated.logits[step], reference[step], rtol=1e-4, atol=1e-4)


def test_decode_drops_follow_the_budget_and_are_recorded_in_original_numbering():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, _FastVThenDecodeDrops.name, keep=10, decode_layer=3, decode_keep=0.5) as pruning:
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, **NO_SPECIAL)
        record = pruning.last
    kept = record.stages[0].kept
    remaining = [set(k.tolist()) for k in record.stages[0].kept_per_item]
    for drop in record.decode_drops:  # each image keeps ceil(0.5 n) of the n tokens layer 3 still caches
        for item, gone in enumerate(drop.dropped_per_item):
            assert gone.numel() == len(remaining[item]) // 2
            assert set(gone.tolist()) <= remaining[item]
            remaining[item] -= set(gone.tolist())
        for sample, gone in enumerate(drop.dropped):
            assert set(gone.tolist()) <= set(kept[sample].tolist())  # original visual numbering of the sample
    assert [len(r) for r in remaining] == [2, 2, 2]  # 10 -> 5 -> 3 -> 2 over three decode steps


def test_frozen_generation_replays_the_decode_drops():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, _FastVThenDecodeDrops.name, keep=10) as pruning:
        first = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, **NO_SPECIAL)
        drops = pruning.last.decode_drops
        with pruning.freeze():
            again = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, **NO_SPECIAL)
            replayed = pruning.last.decode_drops
    assert torch.equal(first, again)
    assert len(replayed) == len(drops) == 3
    for a, b in zip(drops, replayed):
        assert all(torch.equal(x, y) for x, y in zip(a.dropped, b.dropped))


def test_decode_stages_are_refused_where_caches_are_not_plain():
    with pytest.raises(ValueError, match="sliding_attention"):
        vtprune.wrap(tiny_model("gemma3"), _FastVThenDecodeDrops.name, keep=4)
    with pytest.raises(ValueError, match="decode stage layer=9 is outside"):
        vtprune.wrap(tiny_model("llava"), _FastVThenDecodeDrops.name, keep=4, decode_layer=9)
    with pytest.raises(ValueError, match="keep must lie in"):
        vtprune.wrap(tiny_model("llava"), _FastVThenDecodeDrops.name, keep=4, decode_keep=0.0)


def test_beam_search_is_refused_once_drops_make_rows_differ():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": 3, **NO_SPECIAL}
    with (
        vtprune.wrap(model, _FastVThenDecodeDrops.name, keep=10),
        pytest.raises(RuntimeError, match="do not follow beam search's reordering"),
    ):
        model.generate(**batch, **options)
    with vtprune.wrap(model, _FastVThenDecodeDrops.name, keep=10, decode_keep=1.0):  # nothing dropped: beams work
        model.generate(**batch, **options)
