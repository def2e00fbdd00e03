"""MustDrop: window merging on hand-made grids, the dual-attention fill, plain-loop references of stages 1 and 2 on
LLaVA, decode-time drops against a no-cache recomputation, keep=all, every family."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.mustdrop  # registers "mustdrop" (not yet exported by vtprune.methods)
from tests.helpers import FAMILIES, NO_SPECIAL, make_batch, samples_for, tiny_model, visual_mask, with_positions
from tests.methods.common import LLAVA, QWEN, single_item_layout
from vtprune.api import adapter_for, model_info
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import GridPart, Layout, VisualItem
from vtprune.core.registry import DecodeStage, Merged, Stage
from vtprune.methods.mustdrop import MustDrop, grid_windows, window_similarity


def _view(features: torch.Tensor, grid: GridPart, budget: int, final: int, **fields) -> ItemView:
    n = features.shape[0]
    item = VisualItem(0, 0, "image", n, 0, (grid,))
    return ItemView(
        item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), budget, encoder_features=features,
        final_budget=final, **fields,
    )  # fmt: skip


# -- stage 1 on hand-made grids -----------------------------------------------------------------------------------
def test_a_window_of_identical_tokens_merges_into_its_bottom_right_token_and_others_stay():
    torch.manual_seed(0)
    features = torch.randn(36, 8)  # a 6x6 grid: four 3x3 windows, all dissimilar ...
    window = grid_windows(GridPart(0, 6, 6, 6), 3, 3)[3]  # ... but the bottom-right one: identical tokens
    assert window.tolist() == [21, 22, 23, 27, 28, 29, 33, 34, 35]
    features[window] = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    view = _view(features, GridPart(0, 6, 6, 6), budget=36, final=4)
    ctx = PruneContext(stage=Stage(layer=None), model=LLAVA, layout=single_item_layout(36), items=[view])
    (merged,) = MustDrop().select(ctx)
    assert isinstance(merged, Merged) and merged.space == "encoder"
    assert merged.indices.tolist() == [t for t in range(36) if t not in window[:-1].tolist()]  # 35 carries the rest
    assert_close(merged.features[-1], features[35])
    assert_close(merged.features[:-1], features[merged.indices[:-1]])  # untouched tokens keep their features
    assert merged.combined.tolist() == [False] * 27 + [True]


def test_merged_feature_is_the_window_mean_and_the_budget_floor_stops_merging():
    features = torch.randn(36, 4).abs() + 5.0  # every window very similar (positive, large common offset)
    view = _view(features, GridPart(0, 6, 6, 6), budget=36, final=20)
    sims = window_similarity(features[grid_windows(GridPart(0, 6, 6, 6), 3, 3)])
    assert bool((sims > 0.9).all())
    ctx = PruneContext(stage=Stage(layer=None), model=LLAVA, layout=single_item_layout(36), items=[view])
    (merged,) = MustDrop().select(ctx)
    assert merged.indices.numel() == 36 - 8 * 2  # (36 - 20) // 8 = 2 windows, not 4: never below the final budget
    best = sims.argsort(descending=True)[:2]
    for w in best.tolist():
        window = grid_windows(GridPart(0, 6, 6, 6), 3, 3)[w]
        row = merged.indices.tolist().index(int(window[-1]))
        assert_close(merged.features[row], features[window].mean(0))
    # keep = all: the final budget is every token, nothing merges
    dense = _view(features, GridPart(0, 6, 6, 6), budget=36, final=36)
    (kept,) = MustDrop().select(PruneContext(stage=Stage(layer=None), model=LLAVA, layout=single_item_layout(36), items=[dense]))
    assert not isinstance(kept, Merged) and kept.tolist() == list(range(36))


def test_grids_not_divisible_by_the_window_leave_the_border_unmerged():
    windows = grid_windows(GridPart(0, 8, 7, 7), 3, 3)  # 8 rows x 7 cols: 2 x 2 whole windows
    assert windows.shape == (4, 9)
    covered = set(windows.flatten().tolist())
    assert all(t not in covered for t in range(56) if t // 7 >= 6 or t % 7 >= 6)
    # a row stride wider than the grid (LLaVA-NeXT's newline per row) skips the newline tokens
    assert grid_windows(GridPart(10, 3, 3, 4), 3, 3).tolist() == [[10, 11, 12, 14, 15, 16, 18, 19, 20]]


def test_window_similarity_excludes_self_pairs():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # pairs: 2 of 6 unordered pairs are equal
    assert_close(window_similarity(a), torch.tensor([2 / 6]))


# -- stage 2 and stage 3 on hand-made attention ---------------------------------------------------------------------
def test_dual_attention_fill_takes_the_key_set_then_global_and_individual_in_turn():
    n = 8
    # layout: 8 visual tokens, then 2 instruction tokens (slots 8, 9)
    layout = Layout(
        token=torch.arange(10)[None], valid=torch.ones(1, 10, dtype=torch.bool),
        item=torch.tensor([[0] * 8 + [-1, -1]]), item_token=torch.tensor([list(range(8)) + [-1, -1]]),
        positions=torch.arange(10)[None], shift=torch.zeros(1, dtype=torch.long), first_layer=0,
    )  # fmt: skip
    rows = {  # per instruction row, attention over the 10 slots
        8: torch.tensor([0.00, 0.05, 0.10, 0.02, 0.01, 0.30, 0.02, 0.00, 0.5, 0.0]),
        9: torch.tensor([0.40, 0.03, 0.09, 0.02, 0.01, 0.00, 0.05, 0.00, 0.2, 0.2]),
    }
    mean = (rows[8] + rows[9]) / 2  # global: 0 (0.20), 5 (0.15), 2 (0.095), 1, 6, 3, 4, 7

    def attention_rows(slots, real, per_head=False):  # each instruction row's attention, [1, R, L]
        return torch.stack([rows[int(slot)] * float(ok) for slot, ok in zip(slots[0], real[0])])[None]

    cls = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.1]])  # key set: token 3
    item = VisualItem(0, 0, "image", n, 0)
    view = ItemView(item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), 4, cls_attention=cls)
    ctx = PruneContext(
        stage=Stage(layer=3, attention_from=2, query="instruction"), model=LLAVA, layout=layout, items=[view],
        signals=Signals(attention=lambda: mean[None], attention_rows=attention_rows),
    )  # fmt: skip
    (chosen,) = MustDrop(key_share=0.1).select(ctx)  # ceil(0.1 * 8) = 1 key token
    # key 3; global 0; individual (max: 0 0.40, 5 0.30, 2 0.10, 6 0.05) 0 already, next 5; global 0, 5 taken -> 2
    assert chosen.tolist() == [3, 0, 5, 2]
    assert ctx.state["mustdrop_keys"][0].tolist() == [3]
    individual = MustDrop().individual_attention(ctx)
    assert_close(individual[0], torch.maximum(rows[8], rows[9]))


def test_decode_score_ranks_by_the_newest_tokens_attention_with_key_tokens_last():
    item = VisualItem(0, 0, "image", 6, 0)
    view = ItemView(item, 0, torch.tensor([1, 2, 4, 5]), torch.arange(4), torch.ones(4, dtype=torch.bool), 2)
    attention = torch.tensor([[0.1, 0.4, 0.0, 0.3]])
    ctx = PruneContext(
        stage=Stage(layer=3), model=LLAVA, layout=single_item_layout(4), items=[view], step=1,
        state={"mustdrop_keys": {0: torch.tensor([4])}}, signals=Signals(attention=lambda: attention),
    )  # fmt: skip
    (scores,) = MustDrop().decode_score(ctx)
    assert scores.argsort(descending=True).tolist() == [2, 1, 3, 0]  # token 4 (key) first despite 0.0


def test_stages_and_decode_stages_follow_the_options():
    method = MustDrop()
    stages = method.stages(LLAVA, 64)
    assert stages[0].layer is None and stages[0].encoder_features
    assert stages[1] == Stage(layer=3, attention_from=2, query="instruction", vision_layers=(23,))  # 3 of 32
    assert method.decode_stages(LLAVA, 64) == [DecodeStage(layer=3, keep=0.75, every=0)]
    assert MustDrop(decode_ratio=0.0).decode_stages(LLAVA, 64) == []
    assert MustDrop(decode_every=4, layer=5).decode_stages(LLAVA, 64) == [DecodeStage(layer=5, keep=0.75, every=4)]
    assert MustDrop(key_share=0.0).stages(QWEN, 64)[1].vision_layers == ()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"spatial_threshold": 1.5}, "spatial_threshold must lie in"),
        ({"window_size": 1}, "window_size must be an int >= 2"),
        ({"key_share": 1.0}, "key_share must lie in"),
        ({"decode_ratio": 1.0}, "decode_ratio must lie in"),
        ({"decode_every": -1}, "decode_every must be an int >= 0"),
        ({"positions": "shift"}, "positions must be one of"),
    ],
)
def test_bad_options_raise_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        MustDrop(**options)


# -- plain-loop references on LLaVA ---------------------------------------------------------------------------------
def _reference_merge(hidden: torch.Tensor, threshold: float, final: int, side: int = 8):
    """Stage 1 from the spec, in loops: 3x3 windows from the top-left of a side x side grid, mean cosine over pairs of
    distinct tokens, windows >= threshold merged (most similar first, not below ``final``) into the bottom-right."""
    windows, sims = [], []
    for r0 in range(0, side - 2, 3):
        for c0 in range(0, side - 2, 3):
            tokens = [(r0 + i) * side + c0 + j for i in range(3) for j in range(3)]
            total = 0.0
            for a in tokens:
                for b in tokens:
                    if a != b:
                        total += float(torch.cosine_similarity(hidden[a], hidden[b], dim=0))
            windows.append(tokens)
            sims.append(total / 72)
    order = sorted(range(len(windows)), key=lambda w: -sims[w])
    room = (side * side - final) // 8
    merged = [w for w in order if sims[w] >= threshold][:room]
    kept = [t for t in range(side * side) if not any(t in windows[w][:-1] for w in merged)]
    features = {t: hidden[t] for t in kept}
    for w in merged:
        features[windows[w][-1]] = torch.stack([hidden[t] for t in windows[w]]).mean(0)
    return kept, features, sims


def _sample_slots(batch: dict, kept_visual: list[torch.Tensor], length: int | None = None) -> list[list[int]]:
    """Per sample, the prompt positions a layout holds once only ``kept_visual`` (original numbering) of its visual
    tokens remain, left-padded with -1 to the longest."""
    visual, real = visual_mask(batch), batch["attention_mask"].bool()
    rows = []
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().squeeze(1)
        keep = real[b] & ~visual[b]
        keep[positions[kept_visual[b]]] = True
        rows.append(keep.nonzero().squeeze(1).tolist())
    width = length or max(len(r) for r in rows)
    return [[-1] * (width - len(r)) + r for r in rows]


def test_stages_1_and_2_match_plain_loop_references_on_llava():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    tower = model.model.vision_tower
    out = tower(batch["pixel_values"], output_hidden_states=True)
    hidden = out.hidden_states[-2][:, 1:]  # the projected layer, [CLS] dropped
    _, _, sims = _reference_merge(hidden[0], 0.0, 64)
    low, high = sorted(sims)[:2]
    threshold = (low + high) / 2  # three of image 0's four windows qualify; the others' own similarities decide
    keep = 6
    seen = {}
    spy = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with vtprune.wrap(model, "mustdrop", keep=keep, spatial_threshold=threshold, layer=3) as pruning:
        model(**batch)
    spy.remove()
    record = pruning.last
    merged_any = False
    for image in range(3):
        kept, features, _ = _reference_merge(hidden[image], threshold, keep)
        merged_any |= len(kept) < 64
        assert record.stages[0].kept_per_item[image].tolist() == kept
    assert merged_any
    # the LLM's input at each merged token is the projected window mean
    slots = _sample_slots(batch, record.stages[0].kept)
    visual = visual_mask(batch)
    images = [(0, 0, 0), (1, 1, 0), (2, 1, 64)]  # (item, sample, first visual index of the item in its sample)
    for image, b, first in images:
        kept, features, _ = _reference_merge(hidden[image], threshold, keep)
        positions = visual[b].nonzero().squeeze(1)
        for token in kept:
            row = slots[b].index(int(positions[first + token]))
            projected = model.model.multi_modal_projector(features[token])
            assert_close(seen["inputs_embeds"][b, row], projected, rtol=1e-4, atol=1e-5)

    # stage 2: eager attention of layer 2 on the LLM's input after stage 1
    model.set_attn_implementation("eager")
    language = model.model.language_model
    attention = language(
        inputs_embeds=seen["inputs_embeds"], attention_mask=seen["attention_mask"], position_ids=seen["position_ids"],
        output_attentions=True,
    ).attentions[2].mean(1)  # fmt: skip
    tower_cls = tower(batch["pixel_values"], output_attentions=True).attentions[-1].mean(1)[:, 0, 1:]  # last layer
    for image, b, first in images:
        positions = visual[b].nonzero().squeeze(1)
        stage1 = record.stages[0].kept_per_item[image].tolist()
        item_slots = [slots[b].index(int(positions[first + t])) for t in stage1]
        last_visual = max(slots[b].index(int(p)) for p in positions[record.stages[0].kept[b]])
        instruction = [s for s in range(last_visual + 1, len(slots[b])) if slots[b][s] >= 0]
        glob = [sum(float(attention[b, r, s]) for r in instruction) / len(instruction) for s in item_slots]
        indiv = [max(float(attention[b, r, s]) for r in instruction) for s in item_slots]
        key_count = math.ceil(0.08 * len(stage1))
        by_cls = sorted(range(len(stage1)), key=lambda i: -float(tower_cls[image, stage1[i]]))
        chosen = list(by_cls[:key_count])
        by_glob = sorted(range(len(stage1)), key=lambda i: -glob[i])
        by_indiv = sorted(range(len(stage1)), key=lambda i: -indiv[i])
        turn = 0
        while len(chosen) < keep:
            for i in by_glob if turn % 2 == 0 else by_indiv:
                if i not in chosen:
                    chosen.append(i)
                    break
            turn += 1
        expected = sorted(stage1[i] for i in chosen)
        assert record.stages[1].kept_per_item[image].tolist() == expected


# -- decode-time drops: generation = no-cache recomputation with the same drops -------------------------------------
def test_generation_with_decode_drops_equals_a_no_cache_recomputation_with_the_same_drops():
    """Batch of two, left padding. Reference: the frozen prefill (stages 1 and 2 replayed) on the whole sequence
    without cache, and from each decode drop's step t + 1 on, the dropped tokens hidden from those rows in every
    layer (their slots found from the record: after stage 1 in layers 0-2, after stage 2 from layer 3)."""
    model = tiny_model("llava", attn_implementation="eager")  # eager: the reference edits the layers' masks
    batch = make_batch(model, samples_for("llava")[:2])
    assert bool((batch["attention_mask"][:, 0] == 0).any())
    steps, keep, layer = 5, 8, 3
    with vtprune.wrap(
        model, "mustdrop", keep=keep, spatial_threshold=0.0, decode_every=1, decode_ratio=0.3, layer=layer
    ) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **NO_SPECIAL,
        )  # fmt: skip
        record = pruning.last
        assert [drop.step for drop in record.decode_drops] == [1, 2, 3, 4]
        prompt = batch["input_ids"].shape[1]
        visual = visual_mask(batch)
        with pruning.freeze():
            for step in range(steps):
                length = prompt + step
                full = {**batch, "input_ids": generated.sequences[:, :length]}
                full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, step).long()], 1)
                # slots of each segment: the stage's kept visual tokens plus every text and generated token
                before = [s + list(range(prompt, length)) for s in _sample_slots(batch, record.stages[0].kept)]
                after = [s + list(range(prompt, length)) for s in _sample_slots(batch, record.stages[1].kept)]

                def hide(slots):
                    mask = torch.zeros(2, len(slots[0]), len(slots[0]), dtype=torch.bool)
                    for drop in record.decode_drops:
                        for b, gone in enumerate(drop.dropped):
                            columns = [slots[b].index(int(p)) for p in visual[b].nonzero().squeeze(1)[gone]]
                            rows = [i for i, p in enumerate(slots[b]) if p >= prompt + drop.step]
                            mask[b, torch.tensor(rows, dtype=torch.long)[:, None], torch.tensor(columns)] = True
                    return mask

                masks = {0: hide(before), 1: hide(after)}

                def hook(index, masks=masks):
                    def apply(module, args, kwargs):
                        mask = kwargs["attention_mask"]
                        hidden = masks[int(index >= layer)]
                        kwargs["attention_mask"] = mask.masked_fill(hidden[:, None], torch.finfo(mask.dtype).min)
                        return args, kwargs

                    return apply

                blocks = model.model.language_model.layers
                handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
                try:
                    logits = model(**with_positions(model, full), use_cache=False).logits[:, -1]
                finally:
                    for handle in handles:
                        handle.remove()
                assert_close(logits, generated.logits[step], rtol=1e-4, atol=1e-4)
    for drop in record.decode_drops:  # recorded in the sample's original visual numbering, among the kept tokens
        for b, gone in enumerate(drop.dropped):
            assert gone.numel() > 0 and set(gone.tolist()) <= set(record.stages[1].kept[b].tolist())


# -- keep = all, every family ------------------------------------------------------------------------------------------
def test_keep_all_equals_dense_in_prefill_and_without_decode_drops_in_generation():
    model = tiny_model("llava_next")
    batch = make_batch(model, samples_for("llava_next"))
    dense = model(**batch).logits
    dense_ids = model.generate(**batch, max_new_tokens=3, do_sample=False, **NO_SPECIAL)
    with vtprune.wrap(model, "mustdrop", keep=1.0, spatial_threshold=-1.0, decode_ratio=0.0):
        assert_close(model(**batch).logits, dense)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False, **NO_SPECIAL), dense_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family_it_applies_to_and_refuses_the_others(family):
    """Defaults: LLaVA-1.5 and LLaVA-NeXT (the key set needs the tower's [CLS]). Without the key set: every family
    whose decoder layers all use full attention; the others are refused with the reason."""
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    info = model_info(adapter_for(model))
    options = {}
    if not info.has_cls_token:
        with pytest.raises(ValueError, match=r"mustdrop ranks tokens by the vision tower's \[CLS\] attention"):
            vtprune.wrap(model, "mustdrop", keep=4)
        options = {"key_share": 0.0}
    if "linear_attention" in info.layer_types:  # stage 2 cannot rebuild those layers' inputs
        with pytest.raises(ValueError, match="linear_attention"):
            vtprune.wrap(model, "mustdrop", keep=4, **options)
        return
    if any(t != "full_attention" for t in info.layer_types):
        with pytest.raises(ValueError, match="decode-time drops remove cached tokens from every decoder layer"):
            vtprune.wrap(model, "mustdrop", keep=4, **options)
        options["decode_ratio"] = 0.0
    with vtprune.wrap(model, "mustdrop", keep=4, decode_every=1, **options) as pruning:
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, **NO_SPECIAL)
        record = pruning.last
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert [stage.layer for stage in record.stages] == [None, 1]  # the authors' 3 of 32 on 4 layers
    assert all(budget <= 4 for budget in record.stages[1].budgets)
    assert len(record.decode_drops) == (0 if "decode_ratio" in options else 2)
