"""FastVID: DySeg, the authors' budget split, ATS, density anchors and DTM on hand-made clips; the engine's
equivalences on tiny video models (keep = all, batch, cached generate, positions of the born-short prompt)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    Image,
    Video,
    generate_matches_frozen_recomputation,
    make_batch,
    mrope_born_short_logits,
    pooled,
    tiny_model,
)
from tests.methods.common import batch_equals_each_alone, video_keep_all
from vtprune.core.layout import VisualItem
from vtprune.core.registry import make_method
from vtprune.methods.fastvid import (
    FastVID,
    PseudoClsAttention,
    dtm_merge,
    fastvid_select,
    frame_retention,
    segment_budgets,
    segment_video,
    video_budget,
)


def _scene_clip(frames_a: int, frames_b: int, per_frame: int = 8, dim: int = 6) -> torch.Tensor:
    """A clip of two scenes: frames of scene A are small perturbations of one frame, then scene B likewise."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(per_frame, dim, generator=g), torch.randn(per_frame, dim, generator=g) + 3
    noise = [0.01 * torch.randn(per_frame, dim, generator=g) for _ in range(frames_a + frames_b)]
    return torch.stack([(a if t < frames_a else b) + n for t, n in enumerate(noise)])


def _similarity(clip: torch.Tensor) -> torch.Tensor:
    glob = F.normalize(clip.mean(1), dim=-1)
    return (glob[:-1] * glob[1:]).sum(-1)


def test_dyseg_cuts_at_the_scene_change():
    similarity = _similarity(_scene_clip(3, 4))
    assert int(similarity.argmin()) == 2  # frames 2 -> 3 differ
    assert segment_video(similarity, cuts=1, tau=0.0) == [3, 4]  # c = 2: the one least similar pair
    assert segment_video(similarity, cuts=0, tau=0.9) == [3, 4]  # by the threshold alone
    assert segment_video(similarity, cuts=0, tau=-1.0) == [7]  # neither: one segment
    assert segment_video(similarity, cuts=7, tau=-1.0) == [1] * 7  # ours: c - 1 capped at T - 1 pairs
    # threshold and top-k together: cut after 2 (threshold) and after the two least similar
    hand = torch.tensor([0.99, 0.5, 0.98, 0.97, 0.995])
    assert segment_video(hand, cuts=2, tau=0.6) == [2, 2, 2]  # cuts after frames 1 (tau, and least) and 3
    assert segment_video(torch.tensor([]), cuts=7, tau=0.9) == [1]  # a one-frame video


def test_budget_split_is_the_authors():
    # one-frame segment: context = max(int(R d), 1), salient the rest
    assert segment_budgets(20, torch.tensor([]), 30, 0.4, 4, 0.95) == ([12], [8])
    assert segment_budgets(2, torch.tensor([]), 30, 0.4, 4, 0.95) == ([1], [1])  # the floor of one anchor
    assert segment_budgets(10, torch.tensor([]), 30, 0.0, 4, 0.95) == ([10], [0])  # ours: d = 0, no anchor
    # five distinct frames (no sub-segments), R = 10, N = 30: 50 tokens, 20 context on frames 4 and 0 (p = 4)
    distinct = torch.full((4,), 0.5)
    salient, context = segment_budgets(50, distinct, 30, 0.4, 4, 0.95)
    assert salient == [6, 6, 6, 6, 6] and context == [10, 0, 0, 0, 10]
    assert sum(salient) + sum(context) == 50
    # frames 0-1 and 2-4 near-identical (cos >= ignore): two sub-segments, only their last frames keep tokens;
    # the one anchor sub-segment's context is capped at N // 2 and its salient count at N - context
    collapsed = torch.tensor([0.99, 0.5, 0.99, 0.99])
    salient, context = segment_budgets(50, collapsed, 30, 0.4, 4, 0.95)
    assert salient == [0, 15, 0, 0, 15] and context == [0, 0, 0, 0, 15]
    assert segment_budgets(50, collapsed, 30, 0.4, 4, None) == ([6, 6, 6, 6, 6], [10, 0, 0, 0, 10])


def test_keep_maps_to_retention():
    assert frame_retention(0.27, 4, 196) == [52] * 4  # int(196 * 0.27), the authors' R
    assert frame_retention(10, 4, 196) == [3, 3, 2, 2]  # ours: an int per video, split evenly
    video = VisualItem(0, 0, "video", 96, 0, frames=(24, 24, 24, 24))
    assert video_budget(0.3, video) == 4 * 7 and video_budget(50, video) == 50
    assert video_budget(0.3, VisualItem(1, 0, "image", 30, 0)) == 30


def test_salient_tokens_are_the_top_attention_and_counts_are_the_budget():
    clip = _scene_clip(1, 2)
    attention = torch.rand(3, 8, generator=torch.Generator().manual_seed(3))
    rows, features, combined = fastvid_select(clip, attention, [3, 3, 3], c=3, d=0.0)  # every frame a segment
    expected = torch.cat([attention[t].topk(3).indices + 8 * t for t in range(3)]).sort().values
    assert rows.tolist() == expected.tolist() and not bool(combined.any())
    assert_close(features, clip.flatten(0, 1)[rows])  # pure pruning: features untouched
    # with context: every frame keeps R = 3, of which int(3 * 0.4) = 1 merged anchor among its non-salient tokens
    rows, features, combined = fastvid_select(clip, attention, [3, 3, 3], c=3, d=0.4)
    frame = rows // 8
    assert torch.bincount(frame).tolist() == [3, 3, 3] and combined.sum() == 3
    for t in range(3):
        salient = rows[(frame == t) & ~combined] - 8 * t
        assert sorted(salient.tolist()) == sorted(attention[t].topk(2).indices.tolist())


def test_context_tokens_join_their_most_similar_anchor_with_the_w_rule():
    tokens = torch.tensor([
        [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],  # anchors 0 and 1
        [2.0, 0.2, 0.0],  # joins anchor 0 (cosine, not distance: it is far from it)
        [0.1, 1.0, 0.0], [0.0, 3.0, 0.3],  # join anchor 1
    ])  # fmt: skip
    anchors, others = torch.tensor([0, 1]), torch.tensor([2, 3, 4])
    merged = dtm_merge(tokens, anchors, others, beta=0.2)
    # w = max(1 / (count + 1), beta): 1/2 for anchor 0, 1/3 for anchor 1
    assert_close(merged[0], 0.5 * tokens[0] + 0.5 * tokens[2])
    assert_close(merged[1], tokens[1] / 3 + (2 / 3) * (tokens[3] + tokens[4]) / 2)
    merged = dtm_merge(tokens, anchors, others, beta=0.6)  # beta floors both weights
    assert_close(merged[1], 0.6 * tokens[1] + 0.4 * (tokens[3] + tokens[4]) / 2)
    alone = dtm_merge(tokens, anchors, torch.tensor([3]), beta=0.6)
    assert_close(alone[0], tokens[0])  # nobody joined: unchanged


def test_anchors_are_density_peaks_and_a_segment_merges_into_each_anchor_frame():
    """Two frames in one segment; the anchor frame (the last) holds two tight clusters of non-salient tokens: one
    anchor per cluster, and every non-salient token of the segment (frame 0's too) joins the nearer one."""
    g = torch.Generator().manual_seed(1)
    centre = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]])
    frame = torch.cat(
        [centre[0] + 0.05 * torch.randn(4, 4, generator=g), centre[1] + 0.05 * torch.randn(4, 4, generator=g)]
    )
    frame = torch.cat([torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]]), frame])  # 2 salient tokens first
    clip = torch.stack([frame + 0.01, frame])
    attention = torch.tensor([[9.0, 8.0] + [0.0] * 8] * 2)
    # R = 4 per frame, n = 2: context = int(8 * 0.5) = 4 on frame 1 (capped at N // 2 = 5), salient 4 -> 2 + 2
    rows, features, combined = fastvid_select(clip, attention, [4, 4], c=1, tau=-1.0, ignore=None, d=0.5)
    assert rows[~combined].tolist() == [0, 1, 10, 11]
    anchors = rows[combined] - 10
    assert combined.sum() == 4 and bool((anchors >= 2).all())
    assert {int(a) < 6 for a in anchors} == {True, False}  # both clusters hold anchors
    # each merged anchor stays within its own cluster (a mean of its members), pulled by frame 0's copies too
    for row, value in zip(rows[combined].tolist(), features[combined]):
        cluster = 0 if row - 10 < 6 else 1
        assert torch.linalg.vector_norm(value - centre[cluster]) < 0.2


def test_pseudo_cls_attention_averages_keys_over_merge_units():
    g = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(3, 8, 5, generator=g), torch.randn(3, 8, 5, generator=g)
    values = PseudoClsAttention(4)(queries, keys, 0.5)
    for head_free_unit in range(2):  # by hand: per head, mean query against each unit's mean key
        logits = torch.stack([
            torch.stack([queries[h].mean(0) @ keys[h, 4 * u : 4 * u + 4].mean(0) * 0.5 for u in range(2)])
            for h in range(3)
        ])  # fmt: skip
        expected = logits.softmax(-1).mean(0)[head_free_unit]
        assert_close(values[4 * head_free_unit : 4 * head_free_unit + 4], expected.expand(4))
    assert_close(values.sum(), torch.tensor(4.0))  # each unit's value on its four rows
    with pytest.raises(RuntimeError, match="merge units of 4"):
        PseudoClsAttention(4)(queries[:, :6], keys[:, :6], 0.5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_keep_all_equals_dense(family):
    _, _, record = video_keep_all(family, "fastvid")
    assert record.stages[0].kept_per_item[1].numel() == record.items[1]["num_tokens"]


def test_video_counts_on_qwen2_5_vl():
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(4, (16, 24)), 4]])
    with vtprune.wrap(model, "fastvid", keep=0.3, c=4) as pruning:  # c >= T: every frame its own segment
        model(**batch)
    image, video = pruning.last.stages[0].kept_per_item
    assert image.numel() == 16  # the image passes through
    frames = torch.bincount(video // 24, minlength=4).tolist()
    assert frames == [int(24 * 0.3)] * 4  # one-frame segments: exactly R per frame


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_clip_alone(padding_side):
    prompts = [[3, Video(2, (16, 24)), 4], [2, Image((16, 16)), 5, Video(5, (16, 16)), 2]]
    batch_equals_each_alone("qwen2_5_vl", "fastvid", prompts, padding_side, keep=0.4, c=2)


def test_cached_generate_equals_recomputation():
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(4, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    steps = 4
    with vtprune.wrap(model, "fastvid", keep=0.3, c=2) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps)
        assert pruning.last.stages[0].kept_per_item[0].numel() < 96


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_positions_equal_the_born_short_prompt(family):
    """With d = 0 (no merging) the kept video tokens carry their own features: the pruned forward equals the
    unwrapped model fed only the kept tokens with the full prompt's M-RoPE ids sliced (text after the video too)."""
    model = tiny_model(family)
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(4, (16, 24)), 5], [4, Video(2, (24, 16)), 3]])
    with vtprune.wrap(model, "fastvid", keep=0.3, d=0.0, c=2) as pruning:
        pruned = model(**batch).logits
    record = pruning.last
    index = record.output_index
    valid = index >= 0
    vlm = model.model
    images = list(vlm.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    videos = list(vlm.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output)
    kept = record.stages[0].kept_per_item
    assert kept[1].numel() == 4 * int(24 * 0.3) and kept[0].numel() == 16
    encoder_outputs = {
        "image": pooled([images[0][kept[0]]]),
        "video": pooled([videos[0][kept[1]], videos[1][kept[2]]]),
    }
    born_short = mrope_born_short_logits(model, batch, index, encoder_outputs)
    assert valid.sum(1).max() < batch["input_ids"].shape[1]
    assert_close(pruned[valid], born_short[valid], rtol=1e-4, atol=1e-5)


def test_clear_errors_and_config():
    with pytest.raises(ValueError, match="fastvid prunes videos .* takes no video input"):
        vtprune.wrap(tiny_model("llava"), "fastvid", keep=0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="fastvid accepts budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "fastvid", keep=0.5, budget_unit="frame")
    for option, value in (("c", 0), ("p", 1.5), ("tau", 2.0), ("ignore", "no"), ("d", 1.0), ("beta", -0.1)):
        with pytest.raises(ValueError, match=f"fastvid: {option} must"):
            FastVID(**{option: value})
    with pytest.raises(ValueError, match="unknown option"):
        make_method("fastvid", retention=0.2)
    with vtprune.wrap(model, "fastvid", keep=0.25) as pruning:
        config = pruning.config()
    assert config["method"] == "fastvid" and config["budget_unit"] == "video"
    assert (config["c"], config["tau"], config["ignore"], config["d"], config["p"], config["beta"]) == (
        8, 0.84, 0.95, 0.4, 4, 0.6,
    )  # fmt: skip
    assert vtprune.Method.from_dict(FastVID(ignore=None).to_dict()) == FastVID(ignore=None)


def test_images_only_pass_through():
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Image((24, 16)), 4]])
    dense = model(**batch).logits
    with vtprune.wrap(model, "fastvid", keep=0.1):
        assert_close(model(**batch).logits, dense, rtol=1e-5, atol=1e-5)


def _authors_frame_attention(model, batch: dict) -> torch.Tensor:
    """The authors' ``a_t`` (``Qwen2_5_VLVisionFlashAttention2.forward`` + the vision ``forward``): in the last ViT
    block, the mean query of each frame against keys averaged over each merge unit, softmax, mean over heads, back
    from window to raster order; ``[T, N]`` of the batch's one video."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual, seen = model.model.visual, {}
    attn = visual.blocks[-1].attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    try:
        model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    finally:
        handle.remove()
    hidden = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
    cos, sin = seen["kwargs"]["position_embeddings"]
    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    t, h, w = batch["video_grid_thw"][0].tolist()
    heads, dim = attn.num_heads, q.shape[-1]
    q = q.reshape(heads, t, h * w, dim).mean(-2, keepdim=True)
    k = k.reshape(heads, t, h * w // 4, 4, dim).mean(-2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / dim**0.5, dim=-1, dtype=torch.float32).mean(2).mean(0)
    vision = model.config.vision_config
    window_index, _ = get_vision_window_index(
        batch["video_grid_thw"], vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    return weights.reshape(-1)[torch.argsort(window_index)].reshape(t, -1)


def _authors_selection(embeds, attention, r, c, tau, ignore, d, p, beta):
    """The selection loop of the authors' ``Qwen2_5_VLForConditionalGeneration.forward`` (FastVID block) for one
    video, written out as they do (density noise left out: these features have no ties); returns the kept flat
    indices (ascending) and their features."""
    frames, per_frame, _ = embeds.shape
    glob = embeds.float().mean(1)
    glob = glob / glob.norm(dim=1, keepdim=True)
    sim = (glob[:-1] * glob[1:]).sum(1)
    cuts = torch.unique(torch.cat([torch.topk(sim, c - 1, largest=False).indices, torch.nonzero(sim < tau)[:, 0]]))
    cuts = cuts.sort().values.tolist()
    sizes = [cuts[0] + 1] + [b - a for a, b in itertools.pairwise(cuts)] + [frames - cuts[-1] - 1]
    retain = int(per_frame * r)
    keep_rows, keep_values, start = [], [], 0
    for n in sizes:
        states, attn, g = embeds[start : start + n].float(), attention[start : start + n], glob[start : start + n]
        context = max(int(retain * n * d), 1)
        salient = retain * n - context
        if n == 1:
            sal_counts, ctx_counts = [salient], [context]
        else:
            sub_sim = (g[:-1] * g[1:]).sum(1)
            sub_cuts = torch.nonzero(sub_sim < ignore)[:, 0].tolist()
            if sub_cuts:
                sub = [sub_cuts[0] + 1] + [b - a for a, b in itertools.pairwise(sub_cuts)] + [n - sub_cuts[-1] - 1]
            else:
                sub = [n]
            m = len(sub)
            sal = [salient // m + (1 if i < salient % m else 0) for i in range(m)]
            reps = (m + p - 1) // p
            temp = [context // reps + (1 if i < context % reps else 0) for i in range(reps)]
            ctx, j = [], 0
            for i in range(m):
                if i % p == 0:
                    ctx.append(min(temp[j], per_frame // 2))
                    j += 1
                else:
                    ctx.append(0)
            ctx.reverse()
            sal_counts, ctx_counts = [], []
            for i in range(m):
                sal_counts += [0] * (sub[i] - 1)
                ctx_counts += [0] * (sub[i] - 1)
                if ctx[i] == 0:
                    sal_counts.append(min(sal[i], per_frame))
                    ctx_counts.append(0)
                else:
                    ctx_counts.append(min(ctx[i], per_frame // 2))
                    sal_counts.append(min(sal[i], per_frame - ctx_counts[-1]))
        salient_rows, context_rows = [], []
        for f in range(n):
            top = torch.topk(attn[f], sal_counts[f]).indices if sal_counts[f] > 0 else None
            if ctx_counts[f] > 0:
                everything = torch.arange(per_frame)
                rest = everything[~torch.isin(everything, top)] if top is not None else everything
                x = states[f][rest][None]
                dist = torch.cdist(x, x) / x.shape[-1] ** 0.5
                density = (-(torch.topk(dist, k=4, dim=-1, largest=False).values ** 2).mean(-1)).exp()
                mask = (density[:, None, :] > density[:, :, None]).float()
                dmax = dist.flatten(1).max(-1)[0][:, None, None]
                delta = (dist * mask + dmax * (1 - mask)).min(-1)[0]
                picked = torch.topk(delta * density, k=ctx_counts[f], dim=-1).indices[0].sort().values
                context_rows.append(rest[picked] + f * per_frame)
            if top is not None:
                salient_rows.append(top + f * per_frame)
        flat = states.reshape(n * per_frame, -1)
        salient_rows = torch.cat(salient_rows)
        unit = flat / flat.norm(dim=-1, keepdim=True)
        merged = []
        for anchors in context_rows:
            others = torch.arange(n * per_frame)
            others = others[~torch.isin(others, torch.cat([salient_rows, anchors]))]
            onehot = torch.zeros(others.numel(), anchors.numel())
            onehot.scatter_(1, (unit[others] @ unit[anchors].T).argmax(1)[:, None], 1)
            weight = (1 / (onehot.sum(0)[:, None] + 1)).clamp(min=beta)
            mean = onehot.T @ flat[others] / onehot.sum(0).clamp(min=1)[:, None]
            merged.append(weight * flat[anchors] + (1 - weight) * mean)
        rows = torch.cat([salient_rows, *context_rows])
        values = torch.cat([flat[salient_rows], *merged])
        order = rows.argsort()
        keep_rows.append(rows[order] + start * per_frame)
        keep_values.append(values[order])
        start += n
    return torch.cat(keep_rows), torch.cat(keep_values)


def _two_scene_video(model, frames: int = 8) -> dict:
    """One Qwen video: frames 0-3 repeat one frame's pixels (slightly perturbed), frames 4-7 another's."""
    batch = make_batch(model, [[3, Video(frames, (16, 24)), 4]])
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // frames
    g = torch.Generator().manual_seed(7)
    scenes = [pixels[:per_frame], pixels[per_frame : 2 * per_frame]]
    noise = [0.02 * torch.randn(per_frame, pixels.shape[1], generator=g) for _ in range(frames)]
    pixels = torch.cat([scenes[t * 2 // frames] + noise[t] for t in range(frames)])
    return {**batch, "pixel_values_videos": pixels}


# c=8 >= T: one-frame segments; c=2: two scenes of four near-identical frames, each collapsed into one sub-segment;
# the last: segments of 3, 1 and 4 frames with anchors every 2nd sub-segment and the caps of the authors' split
@pytest.mark.parametrize("options", [{}, {"c": 2}, {"c": 3, "tau": 0.5, "ignore": 0.999, "p": 2, "beta": 0.3}])
def test_selects_and_merges_what_the_authors_code_does_on_qwen2_5_vl(options):
    """The authors' ``a_t`` (hooked from the last ViT block) and selection loop, transcribed, against the wrap."""
    model = tiny_model("qwen2_5_vl")
    batch = _two_scene_video(model)
    r = 0.3
    config = {"c": 8, "tau": 0.84, "ignore": 0.95, "d": 0.4, "p": 4, "beta": 0.6} | options
    embeds = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output[0]
    attention = _authors_frame_attention(model, batch)
    rows, values = _authors_selection(embeds.reshape(8, 24, -1), attention, r, **config)
    with vtprune.wrap(model, "fastvid", keep=r, **options) as pruning:
        model(**batch)
    [kept] = pruning.last.stages[0].kept_per_item
    assert kept.tolist() == rows.tolist()
    ours, features, combined = fastvid_select(embeds.reshape(8, 24, -1), attention, [int(24 * r)] * 8, **config)
    assert ours.tolist() == rows.tolist() and bool(combined.any())
    assert_close(features, values, rtol=1e-5, atol=1e-5)
