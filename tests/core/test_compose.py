"""Composed methods: a composition equals running its parts by hand in sequence, each part with its own budget,
position convention and state; keep=all is dense; batches, cached generate, JSON; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    Image,
    collate,
    make_batch,
    pooled,
    rows_of,
    samples_for,
    singles_for,
    tiny_model,
    with_positions,
)
from vtprune.testing import IMAGE_TOKEN


def test_a_composition_equals_its_parts_run_by_hand_in_sequence():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, [[4, Image(), 6]]))
    with vtprune.wrap(model, "divprune+fastv", keep=(16, 8), **{"fastv.layer": 2}) as composed:
        logits = model(**batch).logits
    first, second = composed.kept[0][0], composed.kept[1][0]

    # by hand: DivPrune alone at 16, then FastV alone at 8 on the prompt born with only DivPrune's tokens
    with vtprune.wrap(model, "divprune", keep=16) as divprune:
        model(**batch)
    assert torch.equal(first, divprune.kept[0][0])
    features = model.model.get_image_features(batch["pixel_values"]).pooler_output[0][first]
    ids = batch["input_ids"][0]
    image = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    short_ids = torch.cat([ids[: image[0]], ids[image[:16]], ids[image[-1] + 1 :]])[None]
    short = with_positions(model, {"input_ids": short_ids, "attention_mask": torch.ones_like(short_ids)})
    with vtprune.wrap(model, "fastv", keep=8, layer=2) as fastv:
        by_hand = model(**short, mm_encoder_outputs={"image": pooled([features])}).logits
    assert torch.equal(second, first[fastv.kept[0][0]])  # original numbering
    # each part's scores are recorded as they are alone (the engine asks the part itself)
    assert_close(composed.last.stages[1].scores_per_item[0], fastv.last.stages[0].scores_per_item[0])
    assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)


def test_keep_all_in_every_part_is_the_dense_model():
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, samples_for("qwen2_5_vl")[:2])
    dense = model(**batch).logits
    with vtprune.wrap(model, vtprune.Compose(vtprune.MMTok(), vtprune.FastV(layer=2)), keep=(1.0, 1.0)):
        assert_close(model(**batch).logits, dense)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_a_batch_equals_each_sample_alone_and_generate_equals_recomputation(family):
    model = tiny_model(family)
    composed = vtprune.Compose(vtprune.Uniform(), vtprune.TransPrune())  # TransPrune observes layers: own state
    singles = singles_for(model, family)
    batch = with_positions(model, collate(model, singles))
    with vtprune.wrap(model, composed, keep=(6, 3)) as pruning:
        batched, index = model(**batch).logits, pruning.last.output_index
        for sample, single in enumerate(singles[:2]):
            alone = model(**with_positions(model, single)).logits
            assert_close(rows_of(batched, index, sample), rows_of(alone, pruning.last.output_index, 0), rtol=1e-4, atol=1e-4)
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0, suppress_tokens=list(range(120, 128)))  # fmt: skip
        assert [s.where for s in pruning.last.stages][0] == "before the LLM" and len(pruning.last.stages) == 4
        with pruning.freeze():
            prompt = batch["input_ids"].shape[1]
            full = {**batch, "input_ids": generated.sequences[:, : prompt + 1]}
            full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in batch:
                    full[key] = torch.cat([batch[key], torch.zeros(3, 1, dtype=batch[key].dtype)], 1)
            recomputed = model(**with_positions(model, full), use_cache=False).logits
    assert_close(recomputed[:, -1], generated.logits[1], rtol=1e-4, atol=1e-4)


def test_configs_round_trip_and_the_handle_reports_every_part():
    config = vtprune.Compose(vtprune.DivPrune(), vtprune.FastV(layer=3), keeps=(32, 16))
    assert vtprune.Method.from_dict(config.to_dict()) == config
    assert config.label == "divprune+fastv"
    model = tiny_model("llava")
    with vtprune.wrap(model, "divprune+fastv", keep=(0.5, 0.25), **{"fastv.layer": 3}) as pruning:
        described = pruning.config()
    assert described["method"] == "compose" and [p["method"] for p in described["parts"]] == ["divprune", "fastv"]
    assert described["keeps"] == [0.5, 0.25] and described["keep"] == 0.25


@pytest.mark.parametrize(
    "method,keep,options,message",
    [
        ("divprune+random", (16, 8), {}, r"random starts before the LLM, not after divprune's last stage"),
        ("divprune+fastv", (8, 16), {}, r"a later part cannot keep more than an earlier one"),
        ("divprune+fastv", (8,), {}, r"keep needs one budget per part \(2\)"),
        ("divprune+fastv", (16, 0.5), {}, r"all token counts or all fractions"),
        ("fastv", (8, 4), {}, r"one budget per part applies to composed methods"),
        ("divprune+fastv", (16, 8), {"layer": 3}, r"options of a composed method name their part, e.g. fastv.layer"),
        ("divprune+nope", (16, 8), {}, r"unknown method 'nope'|'nope'"),
        ("fastv+fastv", (16, 8), {}, r"joins distinct method names"),
        ("fastv+divprune", (16, 8), {}, r"divprune starts before the LLM, not after fastv's last stage \(at layer 2\)"),
    ],
)
def test_bad_compositions_are_refused_clearly(method, keep, options, message):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        vtprune.wrap(model, method, keep=keep, **options)
    assert not hasattr(model, "_vtprune_pruning")


def test_compositions_of_compositions_and_single_parts_are_refused():
    with pytest.raises(ValueError, match="at least two methods"):
        vtprune.Compose(vtprune.FastV())
    inner = vtprune.Compose(vtprune.DivPrune(), vtprune.FastV())
    with pytest.raises(ValueError, match="not nested compositions"):
        vtprune.Compose(inner, vtprune.Random(layer=3))


def test_a_parts_decode_stages_run_in_the_composition_with_its_own_state():
    """MustDrop's decode-time cache policy inside a composition: with a second part that keeps everything it sees,
    the composition generates and drops exactly what MustDrop alone does (before, compositions lost decode stages)."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    must = {"spatial_threshold": 0.0, "decode_every": 1, "decode_ratio": 0.3, "layer": 1}
    composed = vtprune.Compose(vtprune.MustDrop(**must), vtprune.Random(layer=3))
    info = vtprune.api.model_info(vtprune.adapter_for(model))
    assert [s.part for s in composed.decode_stages(info, 8)] == [0]
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    runs = []
    for method, keep in ((vtprune.MustDrop(**must), 8), (composed, (8, 8))):
        with vtprune.wrap(model, method, keep=keep) as pruning:
            runs.append((model.generate(**batch, **options), pruning.last))
    (alone, alone_record), (together, together_record) = runs
    assert torch.equal(alone, together)
    assert [d.step for d in together_record.decode_drops] == [1, 2, 3] == [d.step for d in alone_record.decode_drops]
    for one, other in zip(alone_record.decode_drops, together_record.decode_drops):
        assert all(torch.equal(a, b) for a, b in zip(one.dropped_per_item, other.dropped_per_item))
