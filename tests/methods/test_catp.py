"""CATP: text-aligned diversity per image at the LLM input, then the query's attention at a shallow layer; hand-made
cases, a plain-loop reference of both stages on LLaVA with eager attention, keep=all, every family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.catp  # registers "catp" (not yet exported by vtprune.methods)
from tests.helpers import FAMILIES, Image, make_batch, samples_for, tiny_model, visual_mask, with_positions
from tests.methods.common import INFO, LLAVA, QWEN, _context
from vtprune.core.context import ItemView, Signals
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage
from vtprune.methods.catp import CATP, aligned_diverse, text_after_items
from vtprune.methods.divprune import max_min_diverse

# an ICL prompt: two demonstrations (image, question + answer) and the query image with its question
ICL = [3, Image(), 6, Image(), 6, Image(), 5]


def test_stage1_prefers_the_text_aligned_token_among_equally_diverse_ones():
    # token 0 is picked first (aligned with the text); tokens 1 and 2 lie at the same distance from it (and from
    # each other's mirror image), so diversity ties them: the one closer to the text wins
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0, 0.4]])  # leans to token 2's direction, not token 1's
    assert aligned_diverse(features, text, 2, alpha=0.5).tolist() == [0, 2]
    assert aligned_diverse(features, torch.tensor([[1.0, 0.4, 0.0]]), 2, alpha=0.5).tolist() == [0, 1]


def test_stage1_keeps_diversity_over_a_duplicate_of_the_aligned_token():
    # token 1 duplicates token 0 (both well aligned with the text); with a balanced alpha the distinct token 2 is kept
    features = torch.tensor([[1.0, 0.0], [0.999, 0.045], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.3]])
    assert sorted(aligned_diverse(features, text, 2, alpha=0.5).tolist()) == [0, 2]
    assert sorted(aligned_diverse(features, text, 2, alpha=1.0).tolist()) == [0, 1]  # alignment alone: the duplicate


def test_stage1_without_text_or_alpha_is_divprune():
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randn(12, 6, generator=generator)
        k = int(torch.randint(1, 12, (1,), generator=generator))
        assert aligned_diverse(x, x[:0], k, alpha=0.5).tolist() == max_min_diverse(x, k).tolist()
        assert aligned_diverse(x, torch.randn(3, 6, generator=generator), k, alpha=0.0).tolist() == max_min_diverse(x, k).tolist()


def _layout(items: list[tuple[int, int]], length: int, valid_from: int = 0) -> tuple[Layout, list[ItemView]]:
    """One sample of ``length`` slots, items (start, count) there, slots before ``valid_from`` padding."""
    item = torch.full((1, length), -1)
    views = []
    for index, (start, count) in enumerate(items):
        item[0, start : start + count] = index
        slots = torch.arange(start, start + count)
        visual = VisualItem(index, 0, "image", count, start)
        views.append(ItemView(visual, index, torch.arange(count), slots, torch.ones(count, dtype=torch.bool), count))
    valid = torch.arange(length)[None] >= valid_from
    layout = Layout(
        token=torch.arange(length)[None], valid=valid, item=item, item_token=torch.zeros(1, length, dtype=torch.long),
        positions=torch.arange(length)[None], shift=torch.zeros(1, dtype=torch.long), first_layer=0,
    )  # fmt: skip
    return layout, views


def test_each_image_reads_the_text_between_it_and_the_next_image():
    # pad pad | text | img0 (3) | text text | img1 (2) img2 (2) | text text text
    layout, views = _layout([(3, 3), (8, 2), (10, 2)], 15, valid_from=2)
    spans = text_after_items(layout, views)
    assert spans[0].tolist() == [6, 7]  # the demonstration's text after it, not the padding or the text before
    assert spans[2].tolist() == [12, 13, 14]
    assert spans[1].tolist() == [12, 13, 14]  # directly followed by another item (a frame): shares its run's text


def test_stage2_keeps_the_tokens_the_query_attends_to():
    attention = torch.tensor([0.01, 0.30, 0.02, 0.25, 0.05, 0.20, 0.07, 0.10])
    ctx = _context([4, 4], [2, 1], Stage(layer=2, attention_from=1, query="instruction"))
    asked = []

    def attention_of(rows, real):
        asked.append((rows.clone(), real.clone()))
        return attention[None]

    ctx.signals = Signals(attention_of=attention_of)
    chosen = CATP().select(ctx)
    assert sorted(chosen[0].tolist()) == [1, 3] and chosen[1].tolist() == [1]
    rows, real = asked[0]
    assert rows[0, real[0]].tolist() == [7]  # no text after the last image: the last token asks


def test_stages_and_options():
    assert CATP().stages(LLAVA, 64) == [Stage(layer=0, scale=2.0), Stage(layer=2, attention_from=1, query="instruction")]
    assert CATP().stages(INFO, 4)[1].layer == 1  # 2 of 32 scaled to 4 layers, at least 1
    assert CATP(layer=5, stage1_scale=3, query="last").stages(QWEN, 64) == [
        Stage(layer=0, scale=3.0), Stage(layer=5, attention_from=4, query="last"),
    ]  # fmt: skip
    linear = ModelInfo(family="qwen3_5", num_layers=4, has_cls_token=False, mrope=True,
                       layer_types=("linear_attention", "full_attention", "linear_attention", "full_attention"))  # fmt: skip
    assert CATP().stages(linear, 4)[1] == Stage(layer=2, attention_from=1, query="instruction")
    with pytest.raises(ValueError, match=r"catp: layer=1 has no softmax-attention layer .* at least 2"):
        CATP(layer=1).stages(linear, 4)
    with pytest.raises(ValueError, match=r"catp: layer=0 is outside"):
        CATP(layer=0).stages(LLAVA, 4)
    for options, message in (
        ({"query": "all"}, r"catp: query must be one of \('instruction', 'last'\)"),
        ({"alpha": 1.5}, r"catp: alpha must be a number in \[0, 1\]"),
        ({"stage1_scale": 0.5}, r"catp: stage1_scale must be a number >= 1"),
        ({"positions": "x"}, r"positions must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            CATP(**options)


def _reference(model, batch: dict, keep: int, alpha: float = 0.5) -> tuple[list[list[int]], list[list[int]]]:
    """Both stages written from the spec with plain loops on one LLaVA sample (eager attention on this side)."""
    ids = batch["input_ids"][0]
    visual = visual_mask(batch)[0]
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[visual] = torch.cat(list(features))
    # the images: runs of visual slots
    slots = visual.nonzero().squeeze(1).tolist()
    images = [slots[i : i + 64] for i in range(0, len(slots), 64)]
    stage1 = []
    for i, image in enumerate(images):
        end = images[i + 1][0] if i + 1 < len(images) else len(ids)
        text = [s for s in range(image[-1] + 1, end)]
        x = torch.nn.functional.normalize(embeds[image].float(), dim=-1)
        t = torch.nn.functional.normalize(embeds[text].float(), dim=-1)
        bonus = [(1 + max(float(x[j] @ t[r]) for r in range(len(text)))) / 2 for j in range(64)]
        dist = (1 - x @ x.T).tolist()
        nearest = [sorted(dist[j])[1] for j in range(64)]
        chosen = [max(range(64), key=lambda j: (1 - alpha) * nearest[j] / 2 + alpha * bonus[j])]
        while len(chosen) < 2 * keep:
            gains = {j: (1 - alpha) * min(dist[j][s] for s in chosen) / 2 + alpha * bonus[j] for j in range(64)}
            chosen.append(max((j for j in range(64) if j not in chosen), key=gains.__getitem__))
        stage1.append(sorted(chosen))
    # stage 2 at layer 1: layer 0's eager attention on the stage-1 sequence (positions renumbered), query rows = the
    # text after the last image, heads and rows averaged, top-keep per image
    kept_slots = [s for s in range(len(ids)) if not visual[s]] + [images[i][j] for i in range(len(images)) for j in stage1[i]]
    kept_slots.sort()
    language = model.model.language_model
    out = language(inputs_embeds=embeds[kept_slots][None], position_ids=torch.arange(len(kept_slots))[None],
                   output_attentions=True)  # fmt: skip
    attention = out.attentions[0][0].mean(0)  # [L', L']
    last_visual = max(i for i, s in enumerate(kept_slots) if visual[s])
    row = attention[last_visual + 1 :].mean(0)
    stage2 = []
    for i, image in enumerate(images):
        positions = [kept_slots.index(image[j]) for j in stage1[i]]
        order = sorted(range(len(positions)), key=lambda p: -float(row[positions[p]]))[:keep]
        stage2.append(sorted(stage1[i][p] for p in order))
    return stage1, stage2


def test_catp_matches_a_plain_loop_reference_on_llava():
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, [ICL], seed=3))
    keep = 5
    expected1, expected2 = _reference(model, batch, keep)
    assert _reference(model, batch, keep, alpha=0.0)[0] != expected1  # the text alignment changes the picks here
    model.set_attn_implementation("sdpa")  # our side runs with SDPA
    with vtprune.wrap(model, "catp", keep=keep) as pruning:
        model(**batch)
    stages = pruning.last.stages
    assert [k.tolist() for k in stages[0].kept_per_item] == expected1
    assert [k.tolist() for k in stages[1].kept_per_item] == expected2


def test_keep_all_equals_dense():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, [ICL, samples_for("llava")[0]]))
    dense = model(**batch).logits
    with vtprune.wrap(model, "catp", keep=1.0) as pruning:
        assert_close(model(**batch).logits, dense)
    assert all(k.numel() == 64 for stage in pruning.last.stages for k in stage.kept_per_item)


@pytest.mark.parametrize("family", FAMILIES)
def test_catp_runs_on_every_family(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    with vtprune.wrap(model, "catp", keep=4) as pruning:
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    record = pruning.last
    first, second = record.stages
    assert first.layer == 0 and all(b <= 8 for b in first.budgets) and all(b <= 4 for b in second.budgets)
    assert record.seq_lens[0] < record.input_length  # stage 1 before any decoder layer
    assert record.seq_lens[second.layer] < record.seq_lens[second.layer - 1]
