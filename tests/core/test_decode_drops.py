"""Decode-time drops of cached visual tokens (DecodeStage): generation with drops equals a no-cache recomputation
of the full sequence whose dropped tokens are masked for exactly the rows and layers the record says; the same for
decode-time masks (``mask_from``: nothing evicted, later layers of a step hide the tokens its record names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model, visual_mask, with_positions
from vtprune.core.engine.decode import decode_masks
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


@dataclass
class _FastVCutEarlier(vtprune.FastV):
    """FastV whose dropped tokens also leave the earlier layers' caches after the prefill (``earlier_caches``)."""

    name = "_fastv_cut_earlier"

    def stages(self, model, keep):
        return [dataclasses.replace(stage, earlier_caches=True) for stage in super().stages(model, keep)]


@dataclass
class _FastVThenDecodeMasks(vtprune.FastV):
    """FastV in prefill, then a masking decode stage: layer ``decode_layer``'s attention chooses, layers
    ``mask_from ..`` hide the rest; every ``fresh``-th step chooses anew, the others reuse (or unmask)."""

    name = "_fastv_decode_masks"
    decode_layer: int = 0
    mask_from: int = 1
    decode_keep: float = 0.5
    fresh: int = 2
    reuse: bool = True

    def decode_stages(self, model, keep):
        return [DecodeStage(layer=self.decode_layer, keep=self.decode_keep, every=1, mask_from=self.mask_from,
                            reuse=self.reuse)]  # fmt: skip

    def decode_score(self, ctx):
        fresh = ctx.step % self.fresh == 1 or self.fresh == 1
        scores = ctx.per_item(ctx.attention())
        return [score if fresh or view.sample == 1 else None for view, score in zip(ctx.items, scores)]


@pytest.fixture(autouse=True)
def _registered():
    register_method(_FastVThenDecodeDrops)
    register_method(_FastVThenDecodeMasks)
    register_method(_FastVCutEarlier)
    yield
    unregister_method(_FastVThenDecodeDrops.name)
    unregister_method(_FastVThenDecodeMasks.name)
    unregister_method(_FastVCutEarlier.name)


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
        for mask in decode_masks(record):  # the row of step t (index prompt + t - 1) until the next record
            later = [m.step for m in decode_masks(record) if m.layer == mask.layer and m.step > mask.step]
            until = min(later or [steps])
            for b, gone in enumerate(mask.hidden):
                rows = slice(prompt + mask.step - 1, prompt + until - 1)
                hidden[mask.first_layer :, b, rows, columns[b][gone]] = True

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


@pytest.mark.parametrize("decode_layer,mask_from,reuse", [(0, 1, True), (1, 3, False), (2, 3, True)])
def test_generation_with_decode_masks_equals_masked_recomputation(decode_layer, mask_from, reuse):
    """Masks at layers before (0, 1), across and after FastV's layer 2; sample 0 reuses (or unmasks) on even steps,
    sample 1 chooses every step. Nothing is evicted: every layer's cache keeps every kept token."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padding
    steps = 6
    options = {"decode_layer": decode_layer, "mask_from": mask_from, "reuse": reuse}
    with vtprune.wrap(model, _FastVThenDecodeMasks.name, keep=12, **options) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **NO_SPECIAL,
        )  # fmt: skip
        record = pruning.last
    masks = decode_masks(record)
    assert [m.step for m in masks] == list(range(1, steps))
    assert not record.decode_drops
    for mask in masks:
        assert mask.first_layer == mask_from and mask.layer == decode_layer
        fresh = mask.step % 2 == 1
        assert mask.chosen == [fresh, True, True]  # items: sample 0's image, sample 1's two images
        for item, gone in enumerate(mask.hidden_per_item):
            # what the read layer caches: FastV's kept tokens from layer 2 on, every token before
            kept = record.stages[0].kept_per_item[item].numel()
            cached = record.items[item]["num_tokens"] if decode_layer < 2 else kept
            if fresh or item > 0:
                assert gone.numel() == cached - -(-cached // 2)  # ceil(0.5 n) kept
            elif reuse:
                previous = masks[mask.step - 2].hidden_per_item[item]
                assert torch.equal(gone, previous)
            else:
                assert gone.numel() == 0
    cache = generated.past_key_values
    prompt_cached = record.tokens_per_layer
    for layer in range(len(prompt_cached)):  # nothing evicted: the prefill's length plus the decoded tokens
        assert cache.layers[layer].keys.shape[-2] == record.seq_lens[layer] + steps - 1
    model.set_attn_implementation("eager")
    reference = masked_recomputation(model, batch, generated.sequences, record, steps)
    for step in range(steps):
        assert_close(generated.logits[step], reference[step], rtol=1e-4, atol=1e-4)
    unmasked = dataclasses.replace(record)
    unmasked.__dict__["decode_masks"] = []  # the masks matter: the recomputation without them differs
    [_, second] = masked_recomputation(model, batch, generated.sequences, unmasked, 2)
    assert not torch.allclose(second, generated.logits[1], atol=1e-4)


def test_frozen_generation_replays_the_decode_masks_and_masks_refuse_beams():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, **NO_SPECIAL}
    with vtprune.wrap(model, _FastVThenDecodeMasks.name, keep=10) as pruning:
        first = model.generate(**batch, **options)
        masks = decode_masks(pruning.last)
        with pruning.freeze():
            again = model.generate(**batch, **options)
            replayed = decode_masks(pruning.last)
        with pytest.raises(RuntimeError, match="do not follow beam search's reordering"):
            model.generate(**{k: v[:1] for k, v in batch.items()}, **options, num_beams=3)
    assert torch.equal(first, again)
    assert len(replayed) == len(masks) == 3
    for a, b in zip(masks, replayed):
        assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden)) and a.chosen == b.chosen
    with pytest.raises(ValueError, match="decode stage mask_from=0 is outside"):
        vtprune.wrap(model, _FastVThenDecodeMasks.name, keep=4, decode_layer=0, mask_from=0)
    with pytest.raises(ValueError, match="decode-time masks hide cached tokens"):
        vtprune.wrap(tiny_model("gemma3"), _FastVThenDecodeMasks.name, keep=4)


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


@pytest.mark.parametrize("layer", [1, 3])
def test_the_earlier_caches_cut_equals_masked_recomputation_and_every_layer_holds_the_kept_tokens(layer):
    """``Stage.earlier_caches`` (PruneVid's retroactive cut): after the prefill, FastV's dropped tokens leave the
    caches of layers < ``layer`` too; decoding equals a no-cache recomputation hiding them from the decode rows in
    every layer (the record's step-0 drop), batch of two with left padding, and every layer caches as many tokens."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    steps = 4
    with vtprune.wrap(model, _FastVCutEarlier.name, keep=12, layer=layer) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **NO_SPECIAL,
        )  # fmt: skip
        record = pruning.last
    (cut,) = record.decode_drops
    assert cut.step == 0 and cut.layer == layer
    for gone, kept, visual in zip(cut.dropped, record.stages[0].kept, visual_mask(batch).sum(1).tolist()):
        assert sorted(gone.tolist() + kept.tolist()) == list(range(visual))  # every visual token: kept or cut
    lengths = {tuple(cached.keys.shape) for cached in generated.past_key_values.layers}
    assert len(lengths) == 1  # layers before the stage hold only the kept tokens, like the ones after it
    model.set_attn_implementation("eager")
    try:
        reference = masked_recomputation(model, batch, generated.sequences, record, steps)
    finally:
        model.set_attn_implementation("sdpa")
    for step in range(steps):
        assert_close(generated.logits[step], reference[step], rtol=1e-4, atol=1e-4)


def test_the_earlier_caches_cut_is_refused_before_the_llm_and_on_linear_attention():
    @dataclass
    class _PreLLMCut(vtprune.Random):
        name = "_pre_llm_cut"

        def stages(self, model, keep):
            return [dataclasses.replace(stage, earlier_caches=True) for stage in super().stages(model, keep)]

    register_method(_PreLLMCut)
    try:
        with pytest.raises(ValueError, match="earlier_caches .* needs an in-LLM stage .* prunes before the LLM"):
            vtprune.wrap(tiny_model("llava"), _PreLLMCut.name, keep=8)
    finally:
        unregister_method(_PreLLMCut.name)
    with pytest.raises(ValueError, match="earlier_caches .* linear_attention layers"):
        vtprune.wrap(tiny_model("qwen3_5"), _FastVCutEarlier.name, keep=8, layer=2)  # layer 1: softmax
