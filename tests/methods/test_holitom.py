"""HoliTom: the DP segmentation on hand-made cosine matrices (against every tiling), static clips collapsing to one
token per place per window, dynamic tokens by attention, the authors' sequential inner merge, and the engine's
equivalences on tiny Qwen videos (keep=all, batch, cached generate, positions)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

import vtprune
import vtprune.methods.holitom  # registers "holitom" without vtprune/methods/__init__.py
from tests.helpers import Image, Video, generate_matches_frozen_recomputation, make_batch, tiny_model
from tests.methods.common import batch_equals_each_alone, video_keep_all
from vtprune.core.registry import make_method
from vtprune.methods.holitom import (
    HoliTom,
    density_merge,
    outer_stage,
    sequential_merge,
    static_windows,
    window_savings,
)


def similarity_of(static: list[list[int]]) -> torch.Tensor:
    """A ``[T-1, N]`` cosine matrix: 1 where ``static[pair][place]`` is 1, 0 elsewhere."""
    return torch.tensor(static, dtype=torch.float)


def best_tiling(similarity: torch.Tensor, tau: float, max_window: int) -> int:
    """The largest saving over every tiling of the frames into windows (brute force over the cut points)."""
    frames = similarity.shape[0] + 1
    saving = window_savings(similarity, tau)
    best = 0
    for cuts in itertools.product([False, True], repeat=frames - 1):
        starts = [0] + [i + 1 for i, cut in enumerate(cuts) if cut]
        ends = [s - 1 for s in starts[1:]] + [frames - 1]
        if any(e - s + 1 > max_window for s, e in zip(starts, ends)):
            continue
        best = max(best, sum(int(saving[s, e]) for s, e in zip(starts, ends)))
    return best


def test_window_savings_count_static_places_times_window_length_minus_one():
    sim = similarity_of([[1, 1, 0], [1, 0, 0], [1, 1, 1]])  # 4 frames, 3 places
    saving = window_savings(sim, tau=0.8)
    assert saving[0, 1] == 2 and saving[0, 2] == 1 * 2 and saving[0, 3] == 1 * 3
    assert saving[1, 2] == 1 and saving[1, 3] == 1 * 2 and saving[2, 3] == 3
    assert saving[2, 2] == 0 and saving[3, 0] == 0


@pytest.mark.parametrize(
    "static,windows,saved",
    [
        ([[1, 1, 1]] * 3, [(0, 3)], 9),  # a static clip: one window of every frame
        ([[0, 0, 0]] * 3, [(0, 0), (1, 1), (2, 2), (3, 3)], 0),  # nothing static: every frame alone
        ([[1, 1], [1, 1], [0, 0], [1, 1]], [(0, 2), (3, 4)], 2 * 2 + 2 * 1),  # a cut where every place changes
        # one long window keeps only place 0 static (1 x 3 = 3); two windows keep all four (4 + 4 = 8)
        ([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], [(0, 1), (2, 3)], 8),
        # a window of all three frames saves 2 x 2 = 4, more than (0, 1) + (2, 2) = 3 or (0, 0) + (1, 2) = 3
        ([[1, 1, 1], [1, 1, 0]], [(0, 2)], 4),
    ],
)
def test_dp_segmentation_finds_the_known_optimal_windows(static, windows, saved):
    sim = similarity_of(static)
    assert static_windows(sim, tau=0.8) == (windows, saved)
    assert saved == best_tiling(sim, 0.8, 1024)


def test_dp_segmentation_respects_max_window_and_prefers_shorter_windows_on_ties():
    sim = similarity_of([[1, 1]] * 4)  # 5 static frames, windows of at most 2: the authors' recurrence
    assert static_windows(sim, tau=0.8, max_window=2) == ([(0, 1), (2, 3), (4, 4)], 4)
    assert static_windows(sim, tau=0.8, max_window=1) == ([(i, i) for i in range(5)], 0)
    # the threshold is strict (cos > tau), as the authors' `feature_sim > tau`
    assert static_windows(torch.full((2, 3), 0.8), tau=0.8)[1] == 0


def test_dp_segmentation_is_optimal_on_random_matrices():
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        frames, places = int(torch.randint(2, 8, (1,), generator=generator)), 5
        sim = torch.rand(frames - 1, places, generator=generator) ** 0.3
        max_window = 3 if trial % 3 == 0 else 1024
        windows, saved = static_windows(sim, tau=0.7, max_window=max_window)
        assert saved == best_tiling(sim, 0.7, max_window)
        assert windows[0][0] == 0 and windows[-1][1] == frames - 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(windows))  # a tiling
        saving = window_savings(sim, 0.7)
        assert sum(int(saving[s, e]) for s, e in windows) == saved


def test_static_clip_collapses_to_one_token_per_place_on_the_window_first_frame():
    torch.manual_seed(0)
    frame = torch.randn(6, 8)
    frames = frame[None].repeat(4, 1, 1)  # 4 identical frames of 6 places
    attention = torch.rand(4, 6)
    plan = outer_stage(frames, attention, budget=10)  # more than 6: r' = 1, nothing left to cluster
    assert plan.windows == [(0, 3)] and plan.saved == 18
    assert plan.rows.tolist() == list(range(6))  # frame 0's slots
    assert_close(plan.features, frame)
    assert bool(plan.combined.all())
    # a smaller budget: the 6 static tokens are DPC-kNN merged to the budget, still on frame 0
    plan = outer_stage(frames, attention, budget=3)
    assert plan.rows.numel() == 3 and bool((plan.rows < 6).all())
    centers, merged = density_merge(frame, 3, 7, 0.6)
    assert plan.rows.tolist() == centers.tolist()
    assert_close(plan.features, merged)


def test_density_merge_is_the_beta_rule():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.2, 5.0]])
    centers, merged = density_merge(x, 2, 7, 0.6)
    assert sorted(centers.tolist()) in ([0, 3], [0, 4], [1, 3], [1, 4], [2, 3], [2, 4])
    for center, row in zip(centers.tolist(), merged):
        group = [0, 1, 2] if center < 3 else [3, 4]
        members = x[[i for i in group if i != center]]
        assert_close(row, 0.6 * x[center] + 0.4 * members.mean(0))


def test_dynamic_tokens_are_the_top_by_attention_per_frame():
    frames = torch.eye(8)[:6][None].repeat(3, 1, 1)  # 3 frames of 6 places ...
    frames[1] = torch.roll(frames[0], 1, dims=1)  # ... every place changes in every frame (cosine 0)
    frames[2] = torch.roll(frames[0], 2, dims=1)
    attention = torch.tensor([
        [0.1, 0.9, 0.3, 0.8, 0.0, 0.0],
        [0.5, 0.0, 0.0, 0.0, 0.6, 0.1],
        [0.0, 0.2, 0.7, 0.0, 0.0, 0.9],
    ])  # fmt: skip
    plan = outer_stage(frames, attention, budget=6)  # no static place: 2 per frame
    assert plan.windows == [(0, 0), (1, 1), (2, 2)] and plan.saved == 0
    assert plan.rows.tolist() == [1, 3, 6 + 0, 6 + 4, 12 + 2, 12 + 5]
    assert_close(plan.features, frames.reshape(18, 8)[plan.rows])
    assert not bool(plan.combined.any())


def test_static_and_dynamic_places_in_one_window_share_the_rescaled_budget():
    torch.manual_seed(1)
    frames = torch.randn(2, 8, 16)
    frames[1, :4] = frames[0, :4]  # places 0-3 static, 4-7 change
    attention = torch.arange(16, dtype=torch.float).reshape(2, 8)  # later places attend more
    plan = outer_stage(frames, attention, budget=6)
    assert plan.windows == [(0, 1)] and plan.saved == 4
    # r' = 6 / (16 - 4) = 0.5: 2 of the 4 static tokens (merged), 2 of 4 dynamic per frame (by attention)
    static = plan.rows[plan.rows < 4]
    assert static.numel() == 2 and bool(plan.combined[: static.numel()].all())
    assert plan.rows[static.numel() :].tolist() == [6, 7, 8 + 6, 8 + 7]
    # a share D of the dynamic budget goes to DPC-kNN centres of the other dynamic tokens instead
    mixed = outer_stage(frames, attention, budget=6, contextual=0.5)
    assert mixed.rows.numel() == 6 and int(mixed.combined.sum()) == 2 + 2


def authors_inner_merge(hidden: torch.Tensor, attention: torch.Tensor, keep: int) -> tuple[list[int], torch.Tensor]:
    """The authors' loop (``Qwen2Model_holitom.forward``) on one video span: topk, cosine to the kept states taken
    before merging, then ``kept = (kept + other) / 2`` for each other token in order."""
    top = attention.topk(keep).indices
    others = [i for i in range(hidden.shape[0]) if i not in top.tolist()]
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    target = (unit[others] @ unit[top].T).argmax(-1)
    states = hidden.clone()
    for other, j in zip(others, target.tolist()):
        states[top[j]] = (states[top[j]] + states[other]) / 2
    kept = sorted(top.tolist())
    return kept, states[kept]


def test_inner_merge_is_the_authors_sequential_average():
    generator = torch.Generator().manual_seed(3)
    for keep in (1, 3, 5):
        hidden = torch.randn(9, 6, generator=generator, dtype=torch.float64).float()
        attention = torch.rand(9, generator=generator)
        chosen, merged, combined = sequential_merge(hidden, attention, keep)
        kept, states = authors_inner_merge(hidden, attention, keep)
        assert chosen.tolist() == kept
        assert_close(merged, states, rtol=1e-5, atol=1e-5)
        assert combined.sum() >= 1


def _clip(model, frames: int = 4, size=(16, 24), seed: int = 0) -> dict:
    """A Qwen video whose temporal slices all repeat the first slice's pixels (a static clip)."""
    batch = make_batch(model, [[3, Video(frames, size), 4]], seed=seed)
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // frames
    return {**batch, "pixel_values_videos": pixels[:per_frame].repeat(frames, 1)}


def test_static_qwen_clip_keeps_the_first_frame_as_the_window_means():
    model = tiny_model("qwen2_vl")
    clip = _clip(model)
    # w/o the inner stage, 24 of 96 tokens: r' = 24 / (96 - 72) = 1, one token per place on frame 0
    with vtprune.wrap(model, "holitom", keep=24, inner_ratio=0.0) as pruning:
        model(**clip)
    stage = pruning.last.stages[0]
    assert pruning.last.items[0]["frames"] == [24, 24, 24, 24]
    assert stage.kept_per_item[0].tolist() == list(range(24))
    features = model.model.get_video_features(clip["pixel_values_videos"], clip["video_grid_thw"]).pooler_output[0]
    assert_close(stage.merges[0].features, features.reshape(4, 24, -1).mean(0), rtol=1e-5, atol=1e-5)
    # the full method: 8 final tokens, 16 before the LLM (all on frame 0), 8 of them from layer 3 on
    with vtprune.wrap(model, "holitom", keep=8) as pruning:
        model(**clip)
    outer, inner = pruning.last.stages
    assert inner.layer == 3 and pruning.last.seq_lens[3] == pruning.last.seq_lens[0] - 8
    assert outer.kept_per_item[0].numel() == 16 and bool((outer.kept_per_item[0] < 24).all())
    assert inner.kept_per_item[0].numel() == 8
    assert bool(torch.isin(inner.kept_per_item[0], outer.kept_per_item[0]).all())


def test_counts_are_exact_and_images_pass_through():
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(4, (16, 24)), 3, Video(3, (24, 16)), 2]])
    with vtprune.wrap(model, "holitom", keep=0.25) as pruning:
        model(**batch)
    outer, inner = pruning.last.stages
    assert [k.numel() for k in outer.kept_per_item] == [16, 48, 36]  # image whole; 2 x round(0.25 * n)
    assert [k.numel() for k in inner.kept_per_item] == [16, 24, 18]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_keep_all_equals_dense(family):
    _, _, record = video_keep_all(family, "holitom")
    assert [s.kept_per_item[1].numel() for s in record.stages] == [record.items[1]["num_tokens"]] * 2


def test_llava_onevision_keeps_its_final_newline():
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Video(3), 4]])
    with vtprune.wrap(model, "holitom", keep=0.25) as pruning:
        model(**batch)
    item = pruning.last.items[0]
    selectable = item["num_tokens"] - 1
    outer, inner = pruning.last.stages
    assert outer.kept_per_item[0].numel() == round(0.5 * selectable) + 1
    assert inner.kept_per_item[0].numel() == round(0.25 * selectable) + 1
    assert int(inner.kept_per_item[0][-1]) == item["num_tokens"] - 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_clip_alone(padding_side):
    prompts = [[3, Video(2, (16, 24)), 4], [2, Image((16, 16)), 5, Video(4, (16, 16)), 2]]
    batch_equals_each_alone("qwen2_vl", "holitom", prompts, padding_side, keep=0.3)


def test_cached_generate_equals_recomputation():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(3, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    steps = 4
    with vtprune.wrap(model, "holitom", keep=0.3) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps)


def test_merged_tokens_keep_their_slots_positions():
    """The outer stage alone on Qwen: the LLM sees exactly the unwrapped model fed the kept slots with the merged
    features and the unpruned 3-D positions of those slots (static tokens on the window's first frame)."""
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 24)), 4]], seed=2)
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // 4
    pixels = pixels.clone()
    pixels[per_frame : 2 * per_frame] = pixels[:per_frame]  # frames 0-1 static, frames 2-3 their own
    batch["pixel_values_videos"] = pixels
    with vtprune.wrap(model, "holitom", keep=0.3, inner_ratio=0.0) as pruning:
        logits = model(**batch).logits
    stage = pruning.last.stages[0]
    [kept] = stage.kept_per_item
    merge = stage.merges[0]
    assert torch.equal(merge.indices, kept) and kept.numel() == round(0.3 * 96)
    assert bool(merge.combined.any()) and bool((kept[merge.combined] < 24).all())  # static tokens on frame 0
    assert not bool(((kept >= 24) & (kept < 48)).any())  # frame 1 is static: it keeps nothing of its own
    ids = batch["input_ids"]
    video = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[video] = False
    keep[video[kept]] = True
    positions, _ = model.model.get_rope_index(
        ids, batch["mm_token_type_ids"], None, batch["video_grid_thw"], attention_mask=batch["attention_mask"]
    )
    embeds = model.model.get_input_embeddings()(ids)[0].clone()
    embeds[video[kept]] = merge.features.to(embeds.dtype)
    reference = model(inputs_embeds=embeds[keep][None], position_ids=positions[:, :, keep]).logits
    assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_clear_errors_and_config():
    with pytest.raises(ValueError, match="holitom merges videos .* LLaVA-1.5 takes no video input"):
        vtprune.wrap(tiny_model("llava"), "holitom", keep=0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "holitom", keep=0.5, budget_unit="frame")
    for option, value in (
        ("tau", 1.5), ("contextual", -0.1), ("beta", "0.6"), ("inner_ratio", 1.0), ("k", 0), ("max_window", 2.0),
        ("layer", "18"), ("positions", "sideways"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=rf"holitom|HoliTom: {option} must"):
            HoliTom(**{option: value})
    with pytest.raises(ValueError, match="layer=9 is outside the model"):
        vtprune.wrap(model, "holitom", keep=0.5, layer=9)
    with pytest.raises(ValueError, match="unknown option"):
        vtprune.wrap(model, "holitom", keep=0.5, ratio=0.1)
    with vtprune.wrap(model, "holitom", keep=0.25) as pruning:
        config = pruning.config()
    assert config == {
        "method": "holitom", "positions": "renumber", "tau": 0.8, "contextual": 0.0, "k": 7, "beta": 0.6,
        "max_window": 1024, "layer": None, "inner_ratio": 0.5, "keep": 0.25, "budget": "final",
        "budget_unit": "video", "family": "qwen_vl",
    }  # fmt: skip
    assert vtprune.Method.from_dict(HoliTom().to_dict()) == HoliTom() == make_method("holitom")
    with vtprune.wrap(model, "holitom", keep=0.25, inner_ratio=0.0) as pruning:  # the authors' "w/o M"
        model(**make_batch(model, [[3, Video(2, (16, 16)), 4]]))
    assert [stage.layer for stage in pruning.last.stages] == [None]


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_one_d_positions_renumber_before_the_llm_and_keep_inside(positions):
    """LLaVA-OneVision (1-D RoPE): the authors renumber after the outer stage and keep positions at the inner one;
    ``positions="keep"`` keeps the original positions at both."""
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Video(3), 4]])
    seen = {}

    def capture(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"].clone()

    layers = model.model.language_model.layers
    handles = [layers[0].register_forward_pre_hook(capture, with_kwargs=True)]
    with vtprune.wrap(model, "holitom", keep=0.25, positions=positions) as pruning:
        model(**batch)
        first = seen["positions"][0]
        handles.append(layers[3].register_forward_pre_hook(capture, with_kwargs=True))
        model(**batch)
        inner = seen["positions"][0]
    for handle in handles:
        handle.remove()
    outer_stage_, inner_stage = pruning.last.stages
    start = int((batch["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    kept_outer = start + outer_stage_.kept_per_item[0]
    kept_inner = start + inner_stage.kept_per_item[0]
    prompt = batch["input_ids"].shape[1]
    outer_slots = torch.ones(prompt, dtype=torch.bool)
    outer_slots[start : start + pruning.last.items[0]["num_tokens"]] = False
    outer_slots[kept_outer] = True
    original = torch.arange(prompt)[outer_slots]
    expected_outer = torch.arange(original.numel()) if positions == "renumber" else original
    assert first.tolist() == expected_outer.tolist()
    inner_slots = ~torch.isin(original, kept_outer) | torch.isin(original, kept_inner)
    assert inner.tolist() == expected_outer[inner_slots].tolist()  # the inner stage keeps, gaps and all
