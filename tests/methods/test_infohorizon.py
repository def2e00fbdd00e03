"""InfoHorizon: the DivPrune + random preset (its stages are those of the Compose it stands for, hand-made clusters,
a plain-loop reference, keep=all, every family) and find_horizon (leave-one-out KL against a plain forward with
the hidden state dropped by hand, batching, the horizon on a hand-made curve, the plot)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.infohorizon  # registers "infohorizon" (not yet exported by vtprune.methods)
from tests.helpers import (
    FAMILIES,
    Image,
    make_batch,
    pooled,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import LLAVA, QWEN
from vtprune.core.registry import Stage
from vtprune.eval.horizon import find_horizon, horizon_of
from vtprune.methods.infohorizon import InfoHorizon
from vtprune.testing import IMAGE_TOKEN


def _by_hand(layer: int, keep: int = 6, **options) -> vtprune.Compose:
    """The composition the preset stands for, written out."""
    random = vtprune.Random(layer=layer, seed=options.get("seed", 0), positions="keep")
    early = options.get("early_scale", 2) * keep
    return vtprune.Compose(vtprune.DivPrune(), random, keeps=(int(early) if isinstance(keep, int) else early, keep))


# -- the preset ---------------------------------------------------------------------------------------------------


def test_defaults_scale_the_horizon_layer_and_double_the_early_budget():
    # 20 of 32 layers, the abstract's "beyond the 20th"; round(20 * 28 / 32) = 18 on a 28-layer model
    assert InfoHorizon().stages(LLAVA, 64) == [
        Stage(layer=None, scale=2.0, part=0, positions="renumber"),
        Stage(layer=20, scale=1.0, part=1, positions="keep"),
    ]
    assert [s.layer for s in InfoHorizon().stages(QWEN, 64)] == [None, 18]
    assert [s.layer for s in InfoHorizon(layer=12).stages(QWEN, 64)] == [None, 12]
    assert [s.scale for s in InfoHorizon(early_scale=4).stages(LLAVA, 0.125)] == [4.0, 1.0]
    for model, layer in ((LLAVA, 20), (QWEN, 18)):
        assert InfoHorizon(seed=3).stages(model, 64) == _by_hand(layer, 64, seed=3).stages(model, 64)


def test_the_preset_selects_exactly_what_the_composition_by_hand_selects():
    for family in ("llava", "qwen2_5_vl"):
        model = tiny_model(family)  # 4 layers: the horizon is layer round(20 * 4 / 32) = 2
        batch = with_positions(model, make_batch(model, samples_for(family)[:2]))
        with vtprune.wrap(model, "infohorizon", keep=6) as preset:
            logits = model(**batch).logits
        with vtprune.wrap(model, _by_hand(2, keep=6), keep=6) as composed:
            expected = model(**batch).logits
        assert [s.layer for s in preset.last.stages] == [None, 2]
        for ours, theirs in zip(preset.kept, composed.kept, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert torch.equal(logits, expected)


def test_divprune_keeps_one_token_per_cluster_then_random_keeps_a_seeded_uniform_subset():
    """Hand-made projected features: 8 tight clusters of 8 tokens. DivPrune's 2 x 4 picks are one per cluster; the
    random stage keeps 4 of them, a different 4 per seed, each of the 8 about equally often."""
    model = tiny_model("llava")
    batch = make_batch(model, [[4, Image(), 6]])
    generator = torch.Generator().manual_seed(0)
    centres = torch.linalg.qr(torch.randn(64, 8, generator=generator)).Q.T  # 8 orthonormal directions
    features = centres.repeat_interleave(8, 0) + 0.01 * torch.randn(64, 64, generator=generator)
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    counts = torch.zeros(8)
    subsets = set()
    for seed in range(40):
        with vtprune.wrap(model, "infohorizon", keep=4, seed=seed) as pruning:
            model(**inputs, mm_encoder_outputs={"image": pooled([features])})
        early, late = pruning.kept[0][0], pruning.kept[1][0]
        assert sorted((early // 8).tolist()) == list(range(8))  # one per cluster
        assert late.numel() == 4 and bool(torch.isin(late, early).all())
        counts[late // 8] += 1
        subsets.add(tuple(late.tolist()))
    assert len(subsets) > 20  # seeded draws differ between seeds
    assert (counts / 40 - 0.5).abs().max() < 0.25  # each cluster's survivor kept about half the time


def test_a_plain_loop_reference_of_the_recipe_selects_the_same_tokens():
    """From the spec: greedy max-min cosine diversity on the projected tokens to 2k, then, at layer L, the k
    survivors with the largest seeded uniform draws (vtprune.Random's per-image, per-stage seeding)."""
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    keep, layer, seed = 5, 2, 7
    with vtprune.wrap(model, "infohorizon", keep=keep, seed=seed) as pruning:
        model(**batch)
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    images_per_sample = [1, 2]
    image = iter(features)
    for sample, count in enumerate(images_per_sample):
        early_kept, late_kept = [], []
        for index in range(count):
            x = next(image)
            normed = x / x.norm(dim=-1, keepdim=True)
            distance = 1 - normed @ normed.T
            nearest = [sorted(distance[:, j].tolist())[1] for j in range(64)]
            chosen = [max(range(64), key=lambda j: nearest[j])]
            while len(chosen) < 2 * keep:
                rest = [j for j in range(64) if j not in chosen]
                chosen.append(max(rest, key=lambda j: min(float(distance[s, j]) for s in chosen)))
            offset = 64 * index
            draw = torch.rand(64, generator=torch.Generator().manual_seed(hash((seed, offset, layer)) % 2**63))
            survivors = sorted(chosen)
            late = sorted(sorted(survivors, key=lambda j: float(draw[j]), reverse=True)[:keep])
            early_kept += [offset + j for j in survivors]
            late_kept += [offset + j for j in late]
        assert pruning.kept[0][sample].tolist() == early_kept
        assert pruning.kept[1][sample].tolist() == late_kept


def test_keep_all_is_the_dense_model():
    for family in ("llava", "qwen2_5_vl"):
        model = tiny_model(family)
        batch = with_positions(model, make_batch(model, samples_for(family)[:2]))
        dense = model(**batch).logits
        with vtprune.wrap(model, "infohorizon", keep=1.0) as pruning:
            assert_close(model(**batch).logits, dense)
        assert pruning.seq_lens == [batch["input_ids"].shape[1]] * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_preset_and_find_horizon_run_on_every_family(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "infohorizon", keep=3) as pruning:
        model(**batch)
        assert [s.layer for s in pruning.last.stages] == [None, 2]
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    seq = pruning.last.seq_lens
    assert seq[2] < seq[1] <= batch["input_ids"].shape[1]  # DivPrune shortened the prompt, random again at layer 2

    one = make_batch(model, samples_for(family)[1:2])  # two images (an image and a video on Qwen-VL)
    report = find_horizon(model, one, layers=[0, 2], max_tokens=3, batch_size=3)
    assert report.information.shape == (2, 3) and bool(report.information.isfinite().all())
    assert float(report.information.min()) > -1e-12  # a KL divergence
    assert len(report.tokens) == 3 and max(report.tokens) < int(visual_mask(one).sum())


def test_config_round_trips_and_per_part_budgets_override_early_scale():
    config = InfoHorizon(layer=3, early_scale=3, seed=None, positions="keep")
    data = json.loads(config.to_json())
    assert data == {"method": "infohorizon", "layer": 3, "early_scale": 3.0, "seed": None, "positions": "keep", "keeps": []}
    assert vtprune.Method.from_dict(data) == config
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "infohorizon", keep=(20, 7), layer=1) as pruning:
        model(**batch)
        described = pruning.config()
    assert [s.budgets for s in pruning.last.stages] == [[20], [7]]
    assert described["method"] == "infohorizon" and described["keeps"] == [20, 7] and described["layer"] == 1
    wrap_keys = ("keep", "budget", "budget_unit", "family")
    assert vtprune.Method.from_dict({k: v for k, v in described.items() if k not in wrap_keys}) == pruning.method


@pytest.mark.parametrize(
    "options,message",
    [
        ({"early_scale": 0.5}, r"early_scale must be a number >= 1"),
        ({"layer": 4}, r"infohorizon: layer=4 is outside the model.*\[0, 3\]"),
        ({"layer": 1.5}, r"layer must be None .* or an int"),
        ({"seed": "a"}, r"seed must be an int or None"),
        ({"positions": "shift"}, r"positions must be None .* or one of \('keep', 'renumber'\)"),
        ({"ratio": 2}, r"unknown option\(s\) ratio"),
    ],
)
def test_bad_options_are_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        vtprune.wrap(tiny_model("llava"), "infohorizon", keep=4, **options)


def test_the_preset_is_not_a_part_of_other_compositions():
    with pytest.raises(ValueError, match="not nested compositions"):
        vtprune.Compose(InfoHorizon(), vtprune.FastV(layer=3))
    with pytest.raises(ValueError, match=r"infohorizon: keep needs one budget per part \(2\)"):
        vtprune.wrap(tiny_model("llava"), "infohorizon", keep=(8, 4, 2))


# -- find_horizon -------------------------------------------------------------------------------------------------


def _information_by_hand(model, batch: dict, layer: int, token: int) -> float:
    """KL(p_full || p_without) with visual token ``token``'s hidden state dropped at layer ``layer`` by a plain
    forward through the remaining decoder layers (tiny LLaVA: Llama decoder, 1-D RoPE); the divergence in float64."""
    lm = model.model.language_model
    dense = model(**batch, output_hidden_states=True)
    log_full = dense.logits[0, -1].double().log_softmax(-1)
    slot = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[token])
    hidden = dense.hidden_states[layer]  # the input of decoder layer `layer`
    keep = torch.arange(hidden.shape[1]) != slot
    hidden, positions = hidden[:, keep], torch.arange(keep.numel())[keep][None]  # positions kept
    n = hidden.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    rotary = lm.rotary_emb(hidden, positions)
    for decoder in lm.layers[layer:]:
        hidden = decoder(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
    log_dropped = model.lm_head(lm.norm(hidden))[0, -1].double().log_softmax(-1)
    return float((log_full.exp() * (log_full - log_dropped)).sum())


def test_information_equals_a_forward_with_the_hidden_state_dropped_by_hand():
    model = tiny_model("llava")
    batch = make_batch(model, [[4, Image(), 6]])
    report = find_horizon(model, batch, layers=[0, 1, 3], max_tokens=6, batch_size=4)
    assert report.layers == [0, 1, 3] and len(report.tokens) == 6 and report.information.shape == (3, 6)
    assert report.tokens == sorted(set(report.tokens)) and all(0 <= t < 64 for t in report.tokens)
    with torch.no_grad():
        for row, layer in enumerate(report.layers):
            for column in (0, 5):
                expected = _information_by_hand(model, batch, layer, report.tokens[column])
                assert expected > 0
                assert_close(float(report.information[row, column]), expected, rtol=1e-4, atol=1e-12)
    assert report.mean == report.information.mean(1).tolist()
    assert report.max == report.information.max(1).values.tolist()
    assert report.horizon_layer == horizon_of(report.layers, report.mean, report.threshold)


def test_batched_removals_equal_one_removal_per_forward_and_tokens_are_a_seeded_subset():
    model = tiny_model("qwen2_5_vl")  # M-RoPE and patch-grid pixels: the copies' pixel inputs are stacked
    batch = make_batch(model, [[3, Image((16, 24)), 4, Image((16, 16)), 2]])
    batched = find_horizon(model, batch, layers=[0, 2], max_tokens=5, batch_size=5, seed=1)
    alone = find_horizon(model, batch, layers=[0, 2], max_tokens=5, batch_size=1, seed=1)
    assert batched.tokens == alone.tokens
    assert_close(batched.information, alone.information, rtol=1e-4, atol=1e-9)
    visual = int(visual_mask(batch).sum())
    every = find_horizon(model, batch, layers=[1], batch_size=16)
    assert every.tokens == list(range(visual)) and set(batched.tokens) < set(every.tokens)
    assert find_horizon(model, batch, layers=[1], max_tokens=5, seed=2).tokens != batched.tokens


def test_the_horizon_is_where_the_mean_falls_below_the_threshold():
    layers, mean = [0, 1, 2, 3, 4, 5], [1.0, 0.6, 0.3, 0.12, 0.09, 0.05]
    assert horizon_of(layers, mean) == 4  # default threshold 0.1: first mean below 0.1
    assert horizon_of(layers, mean, 0.5) == 2
    assert horizon_of(layers, mean, 0.12) == 4  # 0.12 is not below 0.12 x 1.0
    assert horizon_of([4, 8, 12], [2.0, 1.5, 0.5], 0.2) is None
    assert horizon_of([4, 8, 12], [2.0, 1.5, 0.3], 0.2) == 12  # relative to the first measured layer
    with pytest.raises(ValueError, match="one mean per layer"):
        horizon_of([0, 1], [1.0])


def test_find_horizon_writes_the_plot_and_leaves_the_model_unwrapped(tmp_path):
    model = tiny_model("llava")
    batch = make_batch(model, [[4, Image(), 6]])
    dense = model(**batch).logits
    report = find_horizon(model, batch, plot=tmp_path / "horizon.png", max_tokens=4)
    assert report.plot == tmp_path / "horizon.png" and report.plot.stat().st_size > 10_000
    assert report.layers == [0, 1, 2, 3] and len(report.mean) == len(report.max) == 4
    assert not hasattr(model, "_vtprune_pruning")
    assert_close(model(**batch).logits, dense)


@pytest.mark.parametrize(
    "prompts,options,message",
    [
        ([[4, Image(), 6], [5, Image(), 2]], {}, r"one prompt"),
        ([[9]], {}, r"at least one image"),
        ([[4, Image(), 6]], {"layers": [2, 1]}, r"layers must be increasing decoder layers in \[0, 3\]"),
        ([[4, Image(), 6]], {"layers": [4]}, r"layers must be increasing"),
        ([[4, Image(), 6]], {"threshold": 1.5}, r"threshold must lie in \(0, 1\)"),
        ([[4, Image(), 6]], {"max_tokens": 0}, r"max_tokens must be None"),
        ([[4, Image(), 6]], {"batch_size": 0}, r"batch_size must be an int >= 1"),
    ],
)
def test_find_horizon_refuses_bad_inputs_clearly(prompts, options, message):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        find_horizon(model, make_batch(model, prompts), **options)
