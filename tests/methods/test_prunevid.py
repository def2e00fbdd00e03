"""PruneVid: the reference's cluster refinement on hand-made labels, the static/dynamic merge of a hand-made clip,
the per-group budgets of the in-LLM prune (hand-made attention), and the engine's equivalences on videos."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    NO_SPECIAL,
    Image,
    Video,
    generate_matches_frozen_recomputation,
    make_batch,
    tiny_model,
)
from tests.methods.common import batch_equals_each_alone, video_keep_all
from vtprune.core.context import ItemView, PruneContext, Signals
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage, make_method
from vtprune.methods.prunevid import (
    STATE_KEY,
    PruneVid,
    VideoGroups,
    cluster_merge,
    group_quotas,
    merge_video,
    proportional_quotas,
    refine_clusters,
    segment_lengths,
    static_locations,
    video_segments,
)


@pytest.mark.parametrize(
    ("labels", "refined"),
    [
        ([0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]),  # cluster 0's shorter run joins the longer neighbour
        ([0, 1, 0, 0, 2, 2], [0, 0, 0, 0, 2, 2]),  # cluster 1 (one frame only) dissolves, frame 0 goes right
        ([0, 0, 1, 2, 2], [0, 0, 0, 2, 2]),  # neighbours equally long: the left one
        ([0, 0, 1, 2, 2, 2], [0, 0, 2, 2, 2, 2]),  # the longer (right) neighbour
        ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]),  # two longest runs of one cluster both stay
        ([2, 1, 0], [0, 0, 0]),  # every cluster dissolves: label 0
        ([3, 3, 3], [3, 3, 3]),
    ],
)
def test_refine_clusters_makes_runs_like_the_reference(labels, refined):
    assert refine_clusters(torch.tensor(labels)).tolist() == refined
    assert refine_clusters(labels).tolist() == refined


def test_segment_lengths_and_two_scenes():
    assert segment_lengths(torch.tensor([0, 0, 1, 1, 0, 0])) == [2, 2, 2]
    scene = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    frames = torch.cat([scene[0].expand(4, 6, 8), scene[1].expand(4, 6, 8)])  # two scenes of 4 frames
    frames = frames + 0.01 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(1))
    assert video_segments(frames, 0.25, 7) == [4, 4]  # int(8 * 0.25) = 2 clusters
    assert video_segments(frames[:3], 0.25, 7) == [3]  # int(0.75) = 0: one segment (the reference fails)


def _clip(frames: int = 3, static: int = 5, dynamic: int = 4, dim: int = 32) -> tuple[torch.Tensor, list[int]]:
    """``frames`` frames whose first ``static`` locations repeat (up to noise) and whose others are new each frame."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(static, dim, generator=generator)
    clip = torch.randn(frames, static + dynamic, dim, generator=generator)
    clip[:, :static] = base + 0.05 * torch.randn(frames, static, dim, generator=generator)
    return clip, list(range(static))


def test_static_locations_and_merge_of_a_hand_made_clip():
    clip, static = _clip()
    mask = static_locations(clip, 0.8)
    assert mask.nonzero().flatten().tolist() == static
    assert not bool(static_locations(clip[:1], 0.8).any())  # one frame: no pairs, every location dynamic
    tokens = torch.arange(27).reshape(3, 9)
    kept, features, combined, groups = merge_video(
        clip, tokens, ratio=0.25, tau=0.8, cluster_ratio=0.5, k=7, minimum=14
    )
    # one segment; 5 static tokens on frame 0's slots (means over the frames), then 4 dynamic tokens per frame
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 23, 24, 25, 26]
    assert_close(features[:5], clip[:, :5].mean(0))
    assert_close(features[5:9], clip[0, 5:])
    assert combined.tolist() == [True] * 5 + [False] * 12
    assert groups.kinds == [("static", 0, -1), ("dynamic", 0, 0), ("dynamic", 0, 1), ("dynamic", 0, 2)]
    assert groups.tokens.tolist() == sorted(kept.tolist())
    assert groups.group.tolist() == [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4


def test_cluster_merge_means_members_on_the_centre_token():
    points = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [5, 5.1]]).repeat_interleave(3, 0)
    points = points + 0.001 * torch.arange(18.0)[:, None]
    tokens = torch.arange(100, 118)
    where, _, combined = cluster_merge(points, tokens, 0.5, 7, 14)  # 18 > 14: 9 clusters
    assert where.numel() == 9 and bool(combined.any())
    assert set(where.tolist()) <= set(tokens.tolist())
    unchanged = cluster_merge(points[:14], tokens[:14], 0.5, 7, 14)  # not more than 14: as they are
    assert torch.equal(unchanged[0], tokens[:14]) and torch.equal(unchanged[1], points[:14])


def test_group_budgets():
    assert group_quotas([10, 7, 7], 100, 0.4) == [4, 2, 2]  # the authors' int(size * alpha) per group
    assert group_quotas([10, 7, 7], 5, 0.4) == [2, 2, 1]  # capped by keep: proportional, largest remainders
    assert proportional_quotas([10, 7, 7], 12) == [5, 4, 3]  # 5, 3.5, 3.5: the earlier group wins the tie
    assert proportional_quotas([3, 4], 20) == [3, 4]
    assert group_quotas([5, 5], 4, None) == [2, 2]


def _prune_context(budget: int, alpha_layout_scores: torch.Tensor) -> PruneContext:
    """One sample: 2 text tokens, a video of 10 (merged) tokens, 3 text tokens; per-head attention rows given."""
    length = 15
    item = VisualItem(0, 0, "video", 20, 2, frames=(10, 10))
    tokens = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 14, 15])  # what the merge kept (original numbering)
    slots = torch.arange(2, 12)
    layout = Layout(
        token=torch.arange(length)[None],
        valid=torch.ones(1, length, dtype=torch.bool),
        item=torch.tensor([-1, -1] + [0] * 10 + [-1] * 3)[None],
        item_token=torch.tensor([-1, -1, *tokens.tolist(), -1, -1, -1])[None],
        positions=torch.arange(length)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=2,
    )
    view = ItemView(item, 0, tokens, slots, torch.ones(10, dtype=torch.bool), budget)
    kinds = [("static", 0, -1), ("dynamic", 0, 0), ("dynamic", 0, 1)]
    groups = VideoGroups(tokens, torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), kinds)

    def attention_rows(rows, real, per_head):
        assert per_head and rows[0, real[0]].tolist() == [12, 13, 14]  # the text after the video
        return alpha_layout_scores

    info = ModelInfo("qwen_vl", 4, False, True, modalities=("image", "video"))
    return PruneContext(
        stage=Stage(layer=2, attention_from=1),
        model=info,
        layout=layout,
        items=[view],
        state={STATE_KEY: {0: groups}},
        signals=Signals(attention_rows=attention_rows),
    )


def test_prune_keeps_the_most_attended_per_group_by_max_over_heads_and_rows():
    probs = torch.zeros(1, 2, 3, 15)  # [B, heads, rows, L]
    probs[0, 0, 0, 2 + 3] = 0.9  # static token 3: head 0, row 0
    probs[0, 1, 2, 2 + 1] = 0.5  # static token 1: head 1, row 2
    probs[0, 0, 1, 2 + 6] = 0.7  # frame 0's token 12
    probs[0, 1, 1, 2 + 8] = 0.3  # frame 1's token 14
    probs[0, :, :, 2 + 2] = 0.1  # static token 2: low everywhere
    ctx = _prune_context(budget=10, alpha_layout_scores=probs)
    [chosen] = PruneVid(alpha=0.5).prune(ctx)  # int(4 * .5) = 2 static, int(3 * .5) = 1 per frame
    assert ctx.items[0].tokens[chosen].tolist() == [1, 3, 12, 14]
    ctx = _prune_context(budget=3, alpha_layout_scores=probs)
    [chosen] = PruneVid().prune(ctx)  # alpha from keep: 3 of 10 over groups of 4, 3, 3 -> 1.2, .9, .9 -> 1, 1, 1
    assert ctx.items[0].tokens[chosen].tolist() == [3, 12, 14]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_keep_all_equals_dense(family):
    _, _, record = video_keep_all(family, "prunevid", frames=4)
    assert record.stages[0].kept_per_item[1].numel() == record.items[1]["num_tokens"]


def test_video_is_merged_then_pruned_to_keep_and_images_pass():
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(4, (32, 32)), 4]])
    with vtprune.wrap(model, "prunevid", keep=0.2) as pruning:
        model(**batch)
    merge, prune = pruning.last.stages
    assert merge.layer is None and prune.layer == 2  # layer 10 of 32 scaled to 1 of 4, pruned at its output
    assert merge.kept_per_item[0].numel() == prune.kept_per_item[0].numel() == 16  # the image whole
    total = pruning.last.items[1]["num_tokens"]
    assert merge.kept_per_item[1].numel() < total  # merged (at the authors' ratios) ...
    assert prune.kept_per_item[1].numel() == round(0.2 * total)  # ... then pruned to exactly keep
    with vtprune.wrap(model, "prunevid", keep=1.0, alpha=0.4) as pruning:  # the authors' ratio, keep only caps
        model(**batch)
    merged = pruning.last.stages[0].kept_per_item[1].numel()
    assert pruning.last.stages[1].kept_per_item[1].numel() <= int(0.4 * merged) + 8  # int() per group


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_clip_alone(padding_side):
    prompts = [[3, Video(2, (16, 24)), 4], [2, Image((16, 16)), 5, Video(4, (16, 16)), 2]]
    batch_equals_each_alone("qwen2_vl", "prunevid", prompts, padding_side, keep=0.3)


def test_cached_generate_equals_recomputation():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    steps = 4
    # without the cut of the earlier caches, a no-cache forward is the same computation
    with vtprune.wrap(model, "prunevid", keep=0.3, cut_earlier_caches=False) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps)


def test_the_pruned_tokens_leave_the_earlier_layers_caches_as_the_reference_slices_them():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, **NO_SPECIAL)
    with vtprune.wrap(model, "prunevid", keep=0.3) as pruning:
        generated = model.generate(**batch, **options)
        record = pruning.last
    (cut,) = record.decode_drops
    merged, pruned = record.stages
    assert cut.step == 0 and cut.layer == pruned.layer == 2  # selected_layer 1 (10 of 32, scaled to 4) + 1
    for gone, before, after in zip(cut.dropped, merged.kept, pruned.kept):
        assert sorted(gone.tolist() + after.tolist()) == before.tolist()  # what the in-LLM stage dropped
    assert len({tuple(cached.keys.shape) for cached in generated.past_key_values.layers}) == 1
    with vtprune.wrap(model, "prunevid", keep=0.3, cut_earlier_caches=False) as pruning:
        generated = model.generate(**batch, **options)
        assert pruning.last.decode_drops == []
    layers = generated.past_key_values.layers
    assert layers[0].keys.shape[-2] > layers[-1].keys.shape[-2]  # layers 0..1 keep every merged token


def test_clear_errors_and_config():
    with pytest.raises(ValueError, match="prunevid merges and prunes videos .* takes no video input"):
        vtprune.wrap(tiny_model("llava"), "prunevid", keep=0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "prunevid", keep=0.5, budget_unit="frame")
    bad = [("alpha", 0.0), ("alpha", 1.5), ("tau", 2.0), ("cluster_ratio", 0), ("k", 0)]
    bad += [("temporal_segment_ratio", 1.5), ("min_cluster_tokens", -1), ("selected_layer", 1.5)]
    bad += [("cut_earlier_caches", "yes")]
    for option, value in bad:
        with pytest.raises(ValueError, match=f"prunevid: {option} must"):
            PruneVid(**{option: value})
    with pytest.raises(ValueError, match="selected_layer=9 is outside the model"):
        vtprune.wrap(model, "prunevid", keep=0.5, selected_layer=9)
    with pytest.raises(ValueError, match="positions must be one of"):
        PruneVid(positions="sideways")
    assert make_method("prunevid") == PruneVid()
    assert vtprune.Method.from_dict(PruneVid(alpha=0.4).to_dict()) == PruneVid(alpha=0.4)


def test_static_clip_merges_into_the_first_frame():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 24)), 4]])
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // 4
    batch["pixel_values_videos"] = pixels[:per_frame].repeat(4, 1)  # every frame = frame 0: all locations static
    with vtprune.wrap(model, "prunevid", keep=0.99) as pruning:
        model(**batch)
    merge, prune = pruning.last.stages
    assert pruning.last.items[0]["frames"] == [24, 24, 24, 24]
    # 24 static locations > 14: DPC-kNN into 12 tokens, each on a frame-0 slot; keep exceeds them: all stay
    assert merge.kept_per_item[0].numel() == 12 and bool((merge.kept_per_item[0] < 24).all())
    assert torch.equal(prune.kept_per_item[0], merge.kept_per_item[0])
