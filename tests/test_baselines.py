"""Pooling, DivPrune, PyramidDrop and FastV's all-token rule: defining behaviour on hand-made inputs, and a
reference written from the spec (eager attention maps, plain loops) selecting exactly what the method selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model, visual_mask, with_positions
from tests.helpers import pooled as encoder_output
from vtprune.core.budget import stage_budgets
from vtprune.core.registry import ModelInfo
from vtprune.methods.divprune import max_min_diverse
from vtprune.core.budget import pooled_shape
from vtprune.methods.pool import cell_of

LLAVA = ModelInfo(family="llava", num_layers=32, has_cls_token=True, mrope=False, vision_layers=24, vision_feature_layer=22)


# -- pooling -----------------------------------------------------------------------------------------------------


def test_pooled_shapes_follow_the_budget_and_aspect():
    assert pooled_shape(24, 24, 144) == (12, 12)
    assert pooled_shape(24, 24, 64) == (8, 8)
    assert pooled_shape(24, 24, 36) == (6, 6)
    assert pooled_shape(24, 24, 60) == (6, 10)  # exactly the budget, as square as it allows
    assert pooled_shape(24, 24, 61) == (6, 10)  # a prime budget keeps the largest grid below it
    assert pooled_shape(8, 16, 32) == (4, 8)
    assert pooled_shape(3, 3, 100) == (3, 3)


def test_cells_partition_the_grid_like_avg_pool():
    cells = cell_of(24, 24, 8, 8).view(24, 24)
    assert cells[0:3, 0:3].unique().tolist() == [0] and cells[21:, 21:].unique().tolist() == [63]
    assert torch.bincount(cells.flatten()).tolist() == [9] * 64


def test_pool_after_the_projector_is_avg_pool2d():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "pool", keep=16) as pruning:
        pruned = model(**batch).logits
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    pooled = [F.avg_pool2d(f.T.reshape(1, -1, 8, 8), 2).flatten(2)[0].T for f in features]  # 8x8 -> 4x4
    corners = torch.tensor([r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)])
    assert all(torch.equal(kept, corners) for kept in pruning.last.stages[0].kept_per_item)
    # the born-short prompt carrying the pooled features gives the same logits
    index = pruning.last.output_index
    short_ids = batch["input_ids"].gather(1, index.clamp(min=0)).masked_fill(index < 0, 0)
    born_short = model(
        input_ids=short_ids, attention_mask=(index >= 0).long(), mm_encoder_outputs={"image": encoder_output(pooled)}
    ).logits
    assert_close(pruned[index >= 0], born_short[index >= 0], rtol=1e-4, atol=1e-5)


def test_pool_before_the_projector_projects_the_clip_means():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    out = model.model.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
    clip = out.hidden_states[-2][0, 1:]
    means = F.avg_pool2d(clip.T.reshape(1, -1, 8, 8), 4).flatten(2)[0].T  # 8x8 -> 2x2, in CLIP space
    expected = model.model.multi_modal_projector(means)
    with vtprune.wrap(model, "pool", keep=4, where="before") as pruning:
        logits = model(**batch).logits
    index = pruning.last.output_index
    short_ids = batch["input_ids"].gather(1, index)
    born_short = model(input_ids=short_ids, mm_encoder_outputs={"image": encoder_output([expected])}).logits
    assert_close(logits, born_short, rtol=1e-4, atol=1e-5)


# -- DivPrune ----------------------------------------------------------------------------------------------------


def test_divprune_picks_the_spread_out_tokens():
    directions = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.0]])
    picked = max_min_diverse(directions, 3).tolist()
    assert sorted(picked) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])  # one of each cluster
    assert 4 in picked[:2]  # the isolated token is among the first picks


def test_divprune_matches_a_plain_loop_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(12, 6, generator=generator)
        k = int(torch.randint(1, 12, (1,), generator=generator))
        normed = x / x.norm(dim=-1, keepdim=True)
        distance = 1 - normed @ normed.T
        nearest = [sorted(distance[:, j].tolist())[1] for j in range(12)]
        chosen = [max(range(12), key=lambda j: nearest[j])]
        while len(chosen) < k:
            chosen.append(max((j for j in range(12) if j not in chosen), key=lambda j: min(distance[s, j] for s in chosen)))
        assert max_min_diverse(x, k).tolist() == chosen


def test_divprune_on_a_model_uses_the_projected_tokens():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "divprune", keep=6) as pruning:
        model(**batch)
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    for image, kept in zip(features, pruning.last.stages[0].kept_per_item):
        assert torch.equal(kept, max_min_diverse(image, 6).sort().values)


# -- PyramidDrop ----------------------------------------------------------------------------------------------------


def test_pdrop_schedule_halves_after_layers_8_16_24():
    stages = vtprune.PyramidDrop().stages(LLAVA, 72)
    assert [s.layer for s in stages] == [8, 16, 24]
    assert all(s.attention_from == s.layer and s.query == "last" for s in stages)
    assert stage_budgets(72, 576, [(s.layer, s.scale) for s in stages], 32) == [288, 144, 72]
    # the authors' average accounting: (576*8 + 288*8 + 144*8 + 72*8) / 32 = 270
    assert stage_budgets(270, 576, [(s.layer, s.scale) for s in stages], 32, "average") == [288, 144, 72]


def test_pdrop_matches_a_reference_from_eager_attention():
    """One stage after layer 2 (1-based): the last token's attention in layer index 2, head-averaged."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    attention = model(**batch, output_attentions=True).attentions[2].mean(1)
    with vtprune.wrap(model, "pdrop", keep=5, layers=(2,)) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        row = attention[b, -1][visual[b]]  # left padding: the last token is the last slot
        for image in row.split(64):
            assert torch.equal(next(kept), image.topk(5).indices.sort().values)


# -- FastV, the paper's rule -------------------------------------------------------------------------------------


def test_fastv_all_tokens_rule_matches_the_eager_attention_average():
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    attention = model(**batch, output_attentions=True).attentions[1].mean(1)  # [B, L, L]
    with vtprune.wrap(model, "fastv", keep=5, query="all") as pruning:
        model(**batch)
    mask = batch["attention_mask"].bool()
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        received = attention[b][mask[b]].mean(0)[visual[b]]  # averaged over every real query token
        for image in received.split(64):
            assert torch.equal(next(kept), image.topk(5).indices.sort().values)


# -- VisionZip ---------------------------------------------------------------------------------------------------


def test_visionzip_budget_split_follows_the_authors():
    from vtprune.methods.visionzip import split_budget

    assert [split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def _visionzip_reference(attention, keys, hidden, dominant, contextual):
    """The authors' per-view algorithm on [T = 1 + N] tower tokens; returns {token: CLIP feature} (token -1 = [CLS])."""
    patches = attention[1:]
    top = patches.topk(dominant - 1).indices
    out = {-1: hidden[0]}
    for t in top.tolist():
        out[t] = hidden[1 + t]
    remaining = [t for t in range(len(patches)) if t not in set(top.tolist())]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    others = [t for t in remaining if t not in targets]
    normed = keys[1:] / keys[1:].norm(dim=-1, keepdim=True)
    joined = {t: [] for t in targets}
    for t in others:  # plain loop: each joins its most similar target
        similarity = [float(normed[t] @ normed[g]) for g in targets]
        joined[targets[max(range(len(targets)), key=lambda i: similarity[i])]].append(hidden[1 + t])
    for g in targets:
        out[g] = hidden[1 + g] + (torch.stack(joined[g]).mean(0) if joined[g] else 0)
    carrier = next(t for t in remaining if t not in targets)
    return out, carrier


def test_visionzip_matches_the_authors_algorithm_on_llava():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep = 20  # 17 dominant (16 patches + [CLS]) + 3 contextual
    seen = {}
    spy = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with vtprune.wrap(model, "visionzip", keep=keep) as pruning:
        model(**batch)
    spy.remove()
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    keys = {}
    layer = tower.encoder.layers[1].self_attn  # penultimate of 3
    hook = layer.k_proj.register_forward_hook(lambda m, a, o: keys.setdefault("k", o))
    out = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    hook.remove()
    attention = out.attentions[1].mean(1)[:, 0]  # head sum ranks like head mean
    head_keys = keys["k"].unflatten(-1, (layer.num_heads, -1)).mean(2)
    hidden = out.hidden_states[-2]
    index = pruning.last.output_index
    kept = pruning.last.stages[0].kept_per_item
    visual = visual_mask(batch)
    image = 0
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)  # prompt positions of this sample's image tokens
        for first in range(0, positions.numel(), 64):
            expected, carrier = _visionzip_reference(attention[image], head_keys[image], hidden[image], 17, 3)
            tokens = sorted(t for t in expected if t >= 0) + [carrier]
            assert kept[image].tolist() == sorted(tokens)
            # the LLM input at each kept slot is the projected feature the authors build for it
            for token in kept[image].tolist():
                feature = expected[-1] if token == carrier else expected[token]
                row = (index[b] == positions[first + token]).nonzero().item()
                projected = model.model.multi_modal_projector(feature)
                assert_close(seen["embeds"][b, row], projected, rtol=1e-4, atol=1e-5)
            image += 1


# -- SparseVLM ---------------------------------------------------------------------------------------------------


def test_sparsevlm_recycling_counts_follow_the_authors():
    from vtprune.methods.sparsevlm import recycled_clusters

    # 576 -> 300 at the first stage drops 276: top 30 % + 1 = 83 candidates, 83 // 10 + 1 = 9 clusters
    assert recycled_clusters(276) == 9
    assert recycled_clusters(0) == 0 and recycled_clusters(1) == 1


def test_density_peaks_find_separated_clusters():
    from vtprune.methods.sparsevlm import density_peak_clusters

    generator = torch.Generator().manual_seed(0)
    blobs = [torch.randn(6, 4, generator=generator) * 0.05 + centre for centre in (0.0, 5.0, -5.0)]
    centres, assignment = density_peak_clusters(torch.cat(blobs), 3)
    groups = [set(assignment[i * 6 : (i + 1) * 6].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3  # one cluster per blob
    assert sorted((centres // 6).tolist()) == [0, 1, 2]
    assert all(int(assignment[c]) == i for i, c in enumerate(centres.tolist()))


def test_sparsevlm_schedule_and_default_profile():
    stages = vtprune.SparseVLM().stages(LLAVA, 192)  # the profile of the authors' 192 budget
    assert [s.layer for s in stages] == [3, 7, 16] and [s.attention_from for s in stages] == [2, 6, 15]
    assert stage_budgets(110, 576, [(s.layer, s.scale) for s in stages], 32) == [300, 200, 110]
    # with the average accounting, keep=192 lands close to the authors' counts
    assert stage_budgets(192, 576, [(s.layer, s.scale) for s in stages], 32, "average") == [278, 185, 102]
    assert stage_budgets(17, 576, [(s.layer, s.scale) for s in vtprune.SparseVLM().stages(LLAVA, 64)], 32) == [
        66, 30, 17,
    ]  # fmt: skip


def test_sparsevlm_matches_a_reference_from_eager_attention():
    """One stage after layer 1 without recycling: raters from the input embeddings, their attention in layer 1."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    dense = model(**batch, output_attentions=True, output_hidden_states=True)
    attention = dense.attentions[1].mean(1)
    embeds = dense.hidden_states[0]
    with vtprune.wrap(model, "sparsevlm", keep=6, layers=(1,), recycle=False) as pruning:
        model(**batch)
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)
        text = list(range(int(positions.max()) + 1, batch["input_ids"].shape[1]))
        relevance = torch.softmax(embeds[b, positions] @ embeds[b, text].T, dim=1).mean(0)
        raters = [t for t, r in zip(text, relevance.tolist()) if r > float(relevance.mean())]
        score = attention[b, raters][:, positions].mean(0)
        for image in score.split(64):
            assert torch.equal(next(kept), image.topk(6).indices.sort().values)


def test_sparsevlm_recycles_dropped_tokens_into_cluster_means():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "sparsevlm", keep=8, layers=(1,)) as pruning:
        model(**batch)
    stage = pruning.last.stages[0]
    merge = stage.merges[0]
    assert stage.kept_per_item[0].numel() == 8  # top-k and recycled clusters together fill the budget
    assert torch.equal(merge.indices, stage.kept_per_item[0]) and merge.features.shape[0] == 8
    # the top tokens keep their own hidden states; the recycled ones carry cluster means
    from vtprune.methods.sparsevlm import recycled_clusters

    top = next(t for t in range(8, 0, -1) if t + recycled_clusters(64 - t) <= 8 or t == 1)
    assert 8 - top == min(recycled_clusters(64 - top), 8 - top) > 0


# -- Downsample --------------------------------------------------------------------------------------------------


def _small_image_prompt(model, batch, new_rows, new_cols):
    """The single-image prompt the processor would make from the image resized to ``new_rows x new_cols`` tokens:
    patches -> image (plain reshapes) -> bicubic resize -> the processor's own patchify."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from vtprune.testing import IMAGE_TOKEN

    _, height, width = batch["image_grid_thw"][0].tolist()
    rows = batch["pixel_values"]
    image = torch.zeros(3, height * 2, width * 2)
    index = 0
    for block_r in range(height // 2):  # the processor's order: 2x2 merge blocks in raster order, patches within
        for block_c in range(width // 2):
            for r in range(2):
                for c in range(2):
                    patch = rows[index].view(3, 2, 2, 2)[:, 0]  # channels, temporal copy 0, 2x2 pixels
                    top, left = (block_r * 2 + r) * 2, (block_c * 2 + c) * 2
                    image[:, top : top + 2, left : left + 2] = patch
                    index += 1
    size = (new_rows * 4, new_cols * 4)
    small = F.interpolate(image[None], size=size, mode="bicubic", antialias=True)
    pixels, grid_h, grid_w = Qwen2VLImageProcessor().patchify(small, patch_size=2, merge_size=2, temporal_patch_size=2)
    ids = batch["input_ids"][0]
    image_positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    new_ids = torch.cat([ids[: image_positions[0]], torch.full((new_rows * new_cols,), IMAGE_TOKEN), ids[image_positions[-1] + 1 :]])
    return {
        "input_ids": new_ids[None],
        "attention_mask": torch.ones(1, new_ids.numel(), dtype=torch.long),
        "pixel_values": pixels[0],
        "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
        "mm_token_type_ids": (new_ids == IMAGE_TOKEN).int()[None],
    }


def test_downsample_equals_the_model_fed_the_smaller_image():
    from vtprune.testing import Image

    for family in ("qwen2_vl", "qwen2_5_vl"):
        model = tiny_model(family)
        batch = make_batch(model, [[3, Image((32, 48)), 5]])  # 8 x 12 merged tokens
        with vtprune.wrap(model, "downsample", keep=24) as pruning:
            pruned = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=list(range(120, 128)))
        rows, cols = pooled_shape(8, 12, 24)
        assert (rows, cols) == (4, 6)
        small = _small_image_prompt(model, batch, rows, cols)
        expected = model(**small).logits
        assert pruned.shape == expected.shape
        assert_close(pruned, expected, rtol=1e-4, atol=1e-4)
        expected_generation = model.generate(**small, max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=list(range(120, 128)))
        assert torch.equal(generated[:, -4:], expected_generation[:, -4:])


def test_downsample_refuses_clip_towers():
    import pytest

    with pytest.raises(ValueError, match=r"resizes every image to 336 px, .* use 'pool'"):
        vtprune.wrap(tiny_model("llava"), "downsample", keep=16)
