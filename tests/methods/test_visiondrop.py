"""VisionDrop: the authors' schedule, the visual-only LLM stage on hand-made inputs, a plain reference on LLaVA,
keep = all, and the families it serves or refuses."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vtprune
import vtprune.methods.visiondrop  # registers "visiondrop" (not yet imported by vtprune.methods)
from tests.helpers import FAMILIES, NO_SPECIAL, make_batch, samples_for, tiny_model, visual_mask
from tests.methods.common import LLAVA, QWEN
from vtprune.core.budget import stage_budgets
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import Stage
from vtprune.methods.visiondrop import VisionDrop, contextual_merge


def test_schedule_reproduces_the_authors_48_35_26_19():
    stages = VisionDrop().stages(LLAVA, 19)
    assert [s.layer for s in stages] == [None, 8, 16, 24]
    assert stages[0].vision_layers == (22,) and stages[0].encoder_features and stages[0].per_crop
    assert all(s.attention_from == s.layer and s.per_crop for s in stages[1:])
    specs = [(s.layer, s.scale) for s in stages]
    assert stage_budgets(19, 576, specs, 32) == [48, 35, 26, 19]
    # the authors' accounting: (48 * 8 + 35 * 8 + 26 * 8 + 19 * 8) / 32 = 32 tokens on average
    assert stage_budgets(32, 576, specs, 32, "average") == [48, 35, 26, 19]
    # each stage's dominant / contextual split at the authors' budgets
    method = VisionDrop()
    from vtprune.methods.visionzip import split_budget

    splits = [split_budget(b, method._share(i)) for i, b in enumerate([48, 35, 26, 19])]
    assert splits == [(42, 6), (30, 5), (22, 4), (16, 3)]


def test_bad_options_and_families_raise_clear_errors():
    with pytest.raises(ValueError, match=r"schedule has 4 \(dominant, contextual\) pairs, so it needs 3 layers"):
        VisionDrop(layers=(8, 16)).stages(LLAVA, 19)
    with pytest.raises(ValueError, match="layers must increase"):
        VisionDrop(layers=(16, 8, 24)).stages(LLAVA, 19)
    with pytest.raises(ValueError, match=r"layers=40 is outside the model"):
        VisionDrop(layers=(8, 16, 40)).stages(LLAVA, 19)
    with pytest.raises(ValueError, match="schedule totals must not grow"):
        VisionDrop(schedule=((10, 2), (20, 2)))
    with pytest.raises(ValueError, match=r"dominant >= 1 and contextual >= 0"):
        VisionDrop(schedule=((0, 2), (1, 1)))
    with pytest.raises(ValueError, match=r"Qwen2-VL / Qwen2.5-VL towers have no \[CLS\] token; methods that apply"):
        VisionDrop().stages(QWEN, 19)


def test_contextual_merge_keeps_dominant_tokens_and_merges_the_rest_into_stride_targets():
    # 10 tokens, budget 5 with share 0.4: 3 dominant + 2 contextual
    scores = torch.tensor([0.1, 0.9, 0.0, 0.8, 0.2, 0.0, 0.7, 0.0, 0.1, 0.0])
    hidden = torch.tensor(
        [[1.0, 0.0], [5.0, 5.0], [0.9, 0.1], [6.0, 6.0], [0.0, 1.0]]
        + [[0.2, 0.8], [7.0, 7.0], [1.0, 0.2], [0.1, 1.0], [3.0, 0.0]]
    )
    chosen, features, merged = contextual_merge(scores, hidden, 5, 0.4)
    # dominant: 1, 3, 6; remaining 0 2 4 5 7 8 9, step 7 // 2 = 3 -> targets 0 and 5
    assert chosen.tolist() == [1, 3, 6, 0, 5]
    assert merged.tolist() == [False, False, False, True, True]
    assert_close(features[:3], hidden[[1, 3, 6]])
    # 2, 7, 9 point along token 0's direction, 4 and 8 along token 5's: target + mean(joined)
    assert_close(features[3], hidden[0] + hidden[[2, 7, 9]].mean(0))
    assert_close(features[4], hidden[5] + hidden[[4, 8]].mean(0))


def _llm_stage_context(hidden: torch.Tensor, image: slice, budget: int, attention: torch.Tensor, seen: list):
    """One sample: text, one image at ``image``, text; attention_of records the query rows it was asked for."""
    length = hidden.shape[1]
    count = image.stop - image.start
    item = VisualItem(0, 0, "image", count, 0)
    slots = torch.arange(image.start, image.stop)
    view = ItemView(item, 0, torch.arange(count), slots, torch.ones(count, dtype=torch.bool), budget)
    item_of = torch.full((1, length), -1)
    item_of[0, image] = 0
    item_token = torch.full((1, length), -1)
    item_token[0, image] = torch.arange(count)
    layout = Layout(
        token=torch.arange(length)[None], valid=torch.ones(1, length, dtype=torch.bool), item=item_of,
        item_token=item_token, positions=torch.arange(length)[None], shift=torch.zeros(1, dtype=torch.long),
        first_layer=8,
    )  # fmt: skip

    def attention_of(rows, real):
        seen.append(rows[real].tolist())
        return attention[None]

    return PruneContext(
        stage=Stage(layer=8, attention_from=8, per_crop=True), model=LLAVA, layout=layout, items=[view],
        hidden_states=hidden, signals=Signals(attention_of=attention_of),
    )  # fmt: skip


def test_llm_stage_ranks_by_the_attention_image_queries_pay_image_keys():
    """Visual-only: the query rows are the image's own tokens, and text columns never compete."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, 4)
    # text slots 0-2 and 9-11 get the largest attention; among image slots 3-8, slots 4, 7 and 8 lead
    attention = torch.tensor([0.9, 0.9, 0.9, 0.01, 0.30, 0.02, 0.03, 0.25, 0.04, 0.9, 0.9, 0.9])
    seen: list = []
    # layer 8 is stage 1 of the authors' schedule: a budget of 3 with share 5/35 keeps 3 dominant, 0 contextual
    ctx = _llm_stage_context(hidden, slice(3, 9), 3, attention, seen)
    result = VisionDrop().select(ctx)[0]
    assert seen == [[3, 4, 5, 6, 7, 8]]
    assert result.indices.tolist() == [1, 4, 5]  # image tokens at slots 4, 7, 8 (0.30, 0.25, 0.04)
    assert_close(result.features, hidden[0, [4, 7, 8]])


def _sequence(kept, text_positions, visual_positions):
    """Prompt positions of a sample's sequence after a stage: its text and the kept visual tokens, in order."""
    return sorted(text_positions + [visual_positions[t] for t in kept.tolist()])


def test_matches_a_plain_reference_on_llava():
    """Stage 0 is VisionZip with the stage's split; the LLM stage after layer 2 (1-based) is rebuilt from the spec:
    layer 2's Q/K from its input (eager softmax, causal), head mean, image keys, mean over image queries, top
    dominant, stride targets, target + mean of the tokens nearest to it (cosine of the hidden states)."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    layers = model.model.language_model.layers
    options = {"layers": (2,), "schedule": ((14, 4), (8, 3))}  # 18 tokens enter the LLM, 11 after layer 2
    seen: dict = {}
    spy = layers[1].register_forward_hook(
        lambda m, a, k, out: seen.update(h1=out[0] if isinstance(out, tuple) else out, rope=k["position_embeddings"]),
        with_kwargs=True,
    )
    with vtprune.wrap(model, "visiondrop", keep=11, **options) as pruning:
        # registered after the wrap's own pre-hook, so it sees the hidden states the stage left
        after = layers[2].register_forward_pre_hook(
            lambda m, a, k: seen.update(h2=a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        model(**batch)
    spy.remove()
    after.remove()
    record = pruning.last

    # stage 0 = VisionZip with 4 of 18 contextual: the same tokens
    with vtprune.wrap(model, "visionzip", keep=18, contextual_share=4 / 18) as zipped:
        model(**batch)
    assert [k.tolist() for k in zipped.last.stages[0].kept_per_item] == [
        k.tolist() for k in record.stages[0].kept_per_item
    ]

    # stage 1 from the spec, on the hidden states entering layer 2 (left padding)
    h1, (cos, sin), h2 = seen["h1"], seen["rope"], seen["h2"]
    attn, norm = layers[2].self_attn, layers[2].input_layernorm
    x = norm(h1)
    batch_size, length, _ = x.shape
    q = attn.q_proj(x).view(batch_size, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch_size, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    mask = batch["attention_mask"].bool()
    visual = visual_mask(batch)
    stage0 = iter(record.stages[0].kept_per_item)
    stage1 = iter(record.stages[1].kept_per_item)
    for b in range(batch_size):
        text = (mask[b] & ~visual[b]).nonzero().squeeze(1).tolist()
        positions = visual[b].nonzero().squeeze(1).tolist()
        sequence = _sequence(record.stages[0].kept[b], text, positions)
        first = length - len(sequence)  # left padding
        real = torch.arange(length) >= first
        scores = (q[b] @ k[b].transpose(-1, -2)) * attn.scaling
        allowed = real[None, :] & (torch.arange(length)[None, :] <= torch.arange(length)[:, None])
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0).mean(0)
        sequence2 = _sequence(record.stages[1].kept[b], text, positions)
        first2 = h2.shape[1] - len(sequence2)
        for image_start in range(0, len(positions), 64):
            kept0 = next(stage0).tolist()  # this image's tokens entering layer 2, in slot order
            slots = [first + sequence.index(positions[image_start + t]) for t in kept0]
            score = [sum(float(probs[i, j]) for i in slots) / len(slots) for j in slots]
            dominant = sorted(range(len(slots)), key=lambda j: -score[j])[:8]
            remaining = [j for j in range(len(slots)) if j not in dominant]
            step = max(1, len(remaining) // 3)
            targets = remaining[::step][:3]
            assert next(stage1).tolist() == [kept0[j] for j in sorted(dominant + targets)]
            # features: dominant tokens pass on; a target becomes itself + the mean of the remaining tokens whose
            # hidden state is most similar (cosine) to it
            states = h1[b, slots]
            unit = states / states.norm(dim=-1, keepdim=True)
            joined: dict = {g: [] for g in targets}
            for j in remaining:
                if j not in targets:
                    joined[max(targets, key=lambda g: float(unit[j] @ unit[g]))].append(states[j])
            for j in dominant + targets:
                row = first2 + sequence2.index(positions[image_start + kept0[j]])
                want = states[j] + (torch.stack(joined[j]).mean(0) if joined.get(j) else 0)
                assert_close(h2[b, row], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep", [1.0, 10_000])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.filterwarnings("ignore:keep=10000 is at least")
def test_keep_all_equals_dense(family, keep):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, "visiondrop", keep=keep):
        assert_close(model(**batch).logits, dense)


def test_runs_where_the_tower_has_cls_and_refuses_elsewhere():
    for family in FAMILIES:
        model = tiny_model(family)
        batch = make_batch(model, samples_for(family)[:2])
        if family not in ("llava", "llava_next"):
            with pytest.raises(ValueError, match=r"visiondrop ranks tokens by the vision tower's \[CLS\] attention"):
                vtprune.wrap(model, "visiondrop", keep=4)
            continue
        with vtprune.wrap(model, "visiondrop", keep=4) as pruning:
            model(**batch)
            lengths = pruning.last.seq_lens
            assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]  # shorter at each stage
            budgets = [stage.budgets for stage in pruning.last.stages]
            assert len(budgets) == 4 and all(b[0] for b in budgets)
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False, **NO_SPECIAL)
        assert generated.shape[1] == batch["input_ids"].shape[1] + 3
