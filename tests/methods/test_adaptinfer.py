"""AdaptInfer: the authors' text prior and weighted score by hand, a plain-loop reference from eager attention, the
schedule, keep=all, every family, and the offline inflection analysis with its plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.adaptinfer  # registers "adaptinfer" (not yet imported by vtprune.methods)
from tests.helpers import (
    FAMILIES,
    Image,
    inapplicable,
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)
from tests.methods.common import LLAVA, QWEN, _context
from vtprune.core.budget import stage_budgets
from vtprune.core.context import Signals
from vtprune.core.registry import Stage, make_method
from vtprune.eval.inflection import find_inflection_layers, first_change_point, jensen_shannon, pick_inflections
from vtprune.methods.adaptinfer import AdaptInfer, text_prior, weighted_vision_scores


# -- the score on hand-made attention ------------------------------------------------------------------------------
def test_text_prior_is_attention_received_plus_paid_within_the_text():
    # one head, three text tokens, causal rows
    text = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [0.1, 0.1, 0.4]])
    # token 0: received 0.5 + 0.2 + 0.1, paid 0.5, self once -> 0.8; token 1: 0.3 + 0.1 + (0.2 + 0.3) - 0.3 = 0.6
    # token 2: received 0.4, paid 0.1 + 0.1 + 0.4, self once -> 0.6
    assert_close(text_prior(text[None]), torch.tensor([[0.8, 0.6, 0.6]]))
    symmetric = text + text.T - torch.diag(torch.diagonal(text))
    assert_close(text_prior(text), symmetric.sum(0))  # the authors' symmetrised map, summed over rows


def test_the_prior_can_overturn_the_plain_text_mean():
    # slots 0-1 image, 2-3 text (A, B); B attends mostly to itself, so it weighs 0.65 against A's 0.15
    probs = torch.tensor([[[[0.60, 0.30, 0.10, 0.00], [0.10, 0.25, 0.05, 0.60]]]])
    rows, real = torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.bool)
    assert_close(text_prior(probs[..., 2:]), torch.tensor([[[0.15, 0.65]]]))
    scores = weighted_vision_scores(probs, rows, real)[0, :2]
    assert_close(scores, torch.tensor([0.15 * 0.60 + 0.65 * 0.10, 0.15 * 0.30 + 0.65 * 0.25]))
    assert int(scores.argmax()) == 1  # the plain mean over the text rows prefers token 0 (0.35 vs 0.275)
    assert int(probs[0, 0, :, :2].mean(0).argmax()) == 0


def test_vision_score_is_the_prior_weighted_sum_over_text_rows_and_heads():
    # slots: 0-3 image, 4-6 text; two heads with their own priors
    torch.manual_seed(0)
    attention = torch.softmax(torch.randn(1, 2, 3, 7), -1)
    rows, real = torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.bool)
    expected = torch.zeros(7)
    for h in range(2):
        block = attention[0, h][:, 4:7]
        weights = block.sum(0) + block.sum(1) - torch.diagonal(block)
        for t in range(3):
            expected += weights[t] * attention[0, h, t]
    assert_close(weighted_vision_scores(attention, rows, real)[0], expected)


def test_rows_that_do_not_exist_are_not_raters():
    attention = torch.softmax(torch.randn(2, 1, 2, 5, generator=torch.Generator().manual_seed(1)), -1)
    rows = torch.tensor([[3, 4], [4, 0]])  # sample 1 has one text row; its second entry is padding
    real = torch.tensor([[True, True], [True, False]])
    attention[1, :, 1] = 0  # what ctx.attention_rows(per_head=True) returns for a row that is not real
    scores = weighted_vision_scores(attention, rows, real)
    prior = attention[1, 0, 0, 4]  # one rater: it receives and pays only its own attention
    assert_close(scores[1], prior * attention[1, 0, 0])


def test_select_keeps_the_top_tokens_of_each_image_by_the_weighted_score():
    # slots 0-3 image 0, 4-7 image 1, 8-9 text; one head with hand-picked rows
    probs = torch.zeros(1, 1, 2, 10)
    probs[0, 0, 0] = torch.tensor([0.1, 0.0, 0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.3, 0.0])
    probs[0, 0, 1] = torch.tensor([0.0, 0.2, 0.0, 0.1, 0.0, 0.3, 0.0, 0.0, 0.1, 0.3])
    # prior: token 8 gets 0.3 + 0.1 + 0.3 - 0.3 = 0.4, token 9 gets 0.3 + (0.1 + 0.3) - 0.3 = 0.4: equal weights,
    # so each token's score is 0.4 x its column sum
    ctx = _context([4, 4, 2], [2, 1, 2], Stage(layer=2, attention_from=1))
    ctx.items = ctx.items[:2]
    ctx.signals = Signals(attention_rows=lambda rows, real, per_head: probs)
    ctx.layout.item[0, 8:] = -1  # slots 8-9 are text
    chosen = AdaptInfer().select(ctx)
    assert sorted(chosen[0].tolist()) == [1, 2]  # 0.2 and 0.3 beat 0.1 and 0.1
    assert chosen[1].tolist() == [1]  # 0.3


# -- schedule and options ------------------------------------------------------------------------------------------
def test_schedule_is_the_authors_layers_with_a_4x_ratio_per_stage():
    stages = AdaptInfer().stages(LLAVA, 18)
    assert [(s.layer, s.attention_from) for s in stages] == [(2, 1), (11, 10), (21, 20)]
    # the authors' 128-token profile is 290 / 72 / 18
    assert stage_budgets(18, 576, [(s.layer, s.scale) for s in stages], 32) == [288, 72, 18]
    assert [s.attention_from for s in AdaptInfer().stages(QWEN, 18)] == [1, 9, 18]  # scaled to 28 layers
    custom = AdaptInfer(layers=(0, 9, 19), ratio=2).stages(QWEN, 10)  # the authors' Qwen2-VL layers
    assert [(s.layer, s.scale) for s in custom] == [(1, 4.0), (10, 2.0), (20, 1.0)]


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        AdaptInfer(ratio=0.5)
    with pytest.raises(ValueError, match="layers must increase"):
        AdaptInfer(layers=(5, 3)).stages(LLAVA, 8)
    with pytest.raises(ValueError, match=r"layers \(\+1, where the drop happens\)=32 is outside the model"):
        AdaptInfer(layers=(31,)).stages(LLAVA, 8)
    with pytest.raises(ValueError, match="positions must be one of"):
        AdaptInfer(positions="shift")
    with pytest.raises(ValueError, match="unknown option"):
        make_method("adaptinfer", lam=0.5)


# -- the model ----------------------------------------------------------------------------------------------------
def _reference(attention: torch.Tensor, batch: dict, sample: int, keep: int) -> list[torch.Tensor]:
    """From the spec, one sample in plain loops: text rows = real tokens after the last image; per head the
    symmetrised text->text block summed over rows weights each text row's attention; top-``keep`` per image."""
    visual = visual_mask(batch)[sample]
    real = batch["attention_mask"][sample].bool()
    image_slots = visual.nonzero().squeeze(1).tolist()
    text = [p for p in range(image_slots[-1] + 1, visual.numel()) if real[p]]
    heads = attention.shape[1]
    attention = attention.detach()
    score = torch.zeros(visual.numel())
    for h in range(heads):
        for t in text:
            weight = 0.0
            for u in text:
                weight += float(attention[sample, h, u, t]) + float(attention[sample, h, t, u])
            weight -= float(attention[sample, h, t, t])
            score += weight * attention[sample, h, t]
    images, run = [], [image_slots[0]]
    for slot in image_slots[1:]:  # each image is one run of consecutive placeholders
        if slot != run[-1] + 1:
            images.append(run)
            run = []
        run.append(slot)
    images.append(run)
    return [score[slots].topk(keep).indices.sort().values for slots in images]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_matches_a_plain_reference_from_eager_attention(family):
    """One stage after layer 1 (0-based) on SDPA; the reference reads layer 1's eager attention maps (1-D RoPE with
    left padding, and M-RoPE)."""
    eager = tiny_model(family, attn_implementation="eager")
    samples = [[4, Image((16, 16)), 6], [2, Image((24, 16)), 3, Image((32, 16)), 5]]  # images only: one run each
    batch = with_positions(eager, make_batch(eager, samples))
    attention = eager(**batch, output_attentions=True).attentions[1].float()
    model = tiny_model(family)
    with vtprune.wrap(model, "adaptinfer", keep=5, layers=(1,)) as pruning:
        model(**batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for sample in range(2):
        for expected in _reference(attention, batch, sample, 5):
            assert torch.equal(next(kept).sort().values, expected)


def test_three_stages_prune_progressively_on_a_deeper_model():
    model = tiny_model("llava", num_layers=8)
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "adaptinfer", keep=2) as pruning:
        model(**batch)
    record = pruning.last
    assert [s.layer for s in record.stages] == [1, 3, 6]  # after layers 0 / 2 / 5 of 8 (1 / 10 / 20 of 32)
    assert [s.budgets[0] for s in record.stages] == [32, 8, 2]
    assert record.seq_lens[1] > record.seq_lens[3] > record.seq_lens[6]


def test_keep_all_equals_dense():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")))
    dense = model(**batch).logits
    with vtprune.wrap(model, "adaptinfer", keep=1.0, positions="keep") as pruning:
        assert_close(model(**batch).logits, dense)
    assert all(k.numel() == 64 for k in pruning.last.stages[-1].kept_per_item)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family_where_it_applies(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    reason = inapplicable(family, "adaptinfer", {})
    if reason is not None:
        with pytest.raises(ValueError, match="adaptinfer"):
            vtprune.wrap(model, "adaptinfer", keep=4)
        return
    with vtprune.wrap(model, "adaptinfer", keep=4) as pruning:
        model(**batch)
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 2
    record = pruning.last
    assert all(b <= 4 for b in record.stages[-1].budgets)
    assert record.seq_lens[record.stages[-1].layer] < record.seq_lens[0]


# -- offline analysis ------------------------------------------------------------------------------------------------
def test_change_point_is_the_least_squares_split_of_each_curve():
    step = torch.tensor([0.0, 0.1, 0.0, 0.1, 5.0, 5.1, 5.0, 5.1])  # the regime changes after index 3
    ramp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0])  # after index 5 (segments of at least 2)
    assert first_change_point(torch.stack([step, ramp])).tolist() == [3, 5]
    edge = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # a split after index 0 would leave a 1-long segment
    assert first_change_point(edge[None]).tolist() == [1]
    # the brute force over every admissible split, on random curves
    curves = torch.randn(20, 9, generator=torch.Generator().manual_seed(0)).cumsum(1)

    def sse(x: torch.Tensor) -> float:
        return float(((x - x.mean()) ** 2).sum())

    expected = [min(range(2, 8), key=lambda k: sse(c[:k]) + sse(c[k:])) - 1 for c in curves.double()]
    assert first_change_point(curves).tolist() == expected
    with pytest.raises(ValueError, match="at least 4 layers"):
        first_change_point(torch.zeros(1, 3))


def test_jensen_shannon_and_the_choice_of_inflections():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert_close(jensen_shannon(p, q), torch.tensor(math.log(2)))
    assert float(jensen_shannon(p, p)) == 0.0
    histogram = [0, 7, 2, 0, 7, 9, 0, 1]
    assert pick_inflections(histogram, 3) == [1, 4, 5]  # 9, then the two 7s
    assert pick_inflections(histogram, 2) == [1, 5]  # equal counts: the earlier layer
    assert pick_inflections([0, 3, 0, 0], 3) == [1]  # only layers where some curve changes
    with pytest.raises(ValueError, match="count must be an int >= 1"):
        find_inflection_layers(tiny_model("llava"), {}, count=0)
    with pytest.raises(ValueError, match="top_tokens must be a share"):
        find_inflection_layers(tiny_model("llava"), {}, top_tokens=0)
    with pytest.raises(ValueError, match="at least 4 softmax-attention decoder layers"):
        find_inflection_layers(tiny_model("llava", num_layers=3), {})


def test_find_inflection_layers_reports_valid_layers_and_writes_a_plot(tmp_path):
    model = tiny_model("llava", num_layers=6)
    batch = make_batch(model, samples_for("llava"))
    report = find_inflection_layers(model, batch, plot=tmp_path / "inflections.png", count=2)
    assert len(report.shift) == len(report.vision_share) == len(report.change_points) == 6
    assert math.isnan(report.shift[0]) and all(0 <= s <= math.log(2) + 1e-6 for s in report.shift[1:])
    assert all(0 < s < 1 for s in report.vision_share)
    # two samples with images track ceil(0.1 x 64) = 7 and ceil(0.1 x 128) = 13 tokens, one change point each, after
    # layers 1 to 3 (segments of at least two layers)
    assert sum(report.change_points) == 20
    assert report.change_points[0] == report.change_points[4] == report.change_points[5] == 0
    assert 1 <= len(report.inflection_layers) <= 2 and all(1 <= i <= 3 for i in report.inflection_layers)
    assert report.inflection_layers == sorted(report.inflection_layers)
    top = max(report.change_points)
    assert report.change_points.index(top) in report.inflection_layers
    # the layers are usable as the method's schedule
    info = vtprune.api.model_info(vtprune.api.adapter_for(model))
    AdaptInfer(layers=tuple(report.inflection_layers)).stages(info, 4)
    # the score it analyses is the method's own: layer 1's scores rank the image as a one-stage AdaptInfer does
    with vtprune.wrap(model, "adaptinfer", keep=5, layers=(1,)) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for sample in range(2):
        for image in report.scores[1][sample][visual[sample]].split(64):
            assert torch.equal(next(kept).sort().values, image.topk(5).indices.sort().values)

    import matplotlib.image

    pixels = matplotlib.image.imread(report.plot)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].std()) > 0.05  # bars, curve, axes and text, not a blank canvas
    coloured = (pixels[..., :3].max(-1) - pixels[..., :3].min(-1)) > 0.3
    assert coloured.sum() > 200  # the coloured bars, curve and markers are drawn


def test_find_inflection_layers_needs_an_image():
    model = tiny_model("llava")
    batch = make_batch(model, [[9]])
    with pytest.raises(ValueError, match="at least one image"):
        find_inflection_layers(model, batch)
