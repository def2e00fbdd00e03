"""DyCoke: temporal token merging on hand-made clips and against the authors' ``dycole_ttm`` on tiny Qwen2.5-VL
videos, the budget rule, the decode-time KV selection (masking, no eviction) against a no-cache recomputation,
and the engine's equivalences on videos."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import NO_SPECIAL, Image, Video, make_batch, tiny_model, visual_mask
from tests.methods.common import batch_equals_each_alone, video_keep_all
from vtprune.core.engine.decode import decode_masks
from vtprune.core.layout import VisualItem
from vtprune.core.registry import make_method
from vtprune.methods.dycoke import DyCoke, frame_counts, frame_roles, merge_order


def authors_ttm(features: torch.Tensor, per_frame: int, k: float) -> set[int]:
    """The flat indices the authors' ``dycole_ttm`` (llava_arch.py @ dd746349) keeps, written out as it does it:
    pairs (2i, 2i+1), then quadruples i = 0, 4, .. < T - 4 (frame i + 2 against frame i); a set (their order is
    topk order)."""
    frames = features.shape[0] // per_frame
    keep = int((1 - k) * per_frame)
    chosen: dict[int, torch.Tensor] = {}
    for i in range(0, frames - 1, 2):
        a, b = features[i * per_frame : (i + 1) * per_frame], features[(i + 1) * per_frame : (i + 2) * per_frame]
        similarity = F.cosine_similarity(F.normalize(a, dim=1), F.normalize(b, dim=1), dim=1)
        chosen[i] = torch.arange(per_frame)
        chosen[i + 1] = similarity.topk(keep, largest=False).indices
    for i in range(0, frames - 4, 4):
        a, b = features[i * per_frame : (i + 1) * per_frame], features[(i + 2) * per_frame : (i + 3) * per_frame]
        chosen[i + 2] = F.cosine_similarity(a, b, dim=1).topk(keep, largest=False).indices
    return {int(t) + f * per_frame for f, tokens in chosen.items() for t in tokens}


def test_frame_roles_cover_every_frame_and_counts_meet_the_budget():
    assert frame_roles(8) == [-1, 0, 0, 2, -1, 4, 4, 6]  # anchors 0, 4; pairs; frame 4j + 2 against 4j
    assert frame_roles(3) == [-1, 0, 0]  # odd T: the last frame is pruned against frame 0, not dropped (ours)
    assert frame_roles(1) == [-1]
    assert frame_counts(0.5, 8, 196, k=0.7) == [196, 58, 58, 58, 196, 58, 58, 58]  # the authors' int(0.3 * 196)
    counts = frame_counts(0.5, 5, 10)  # 25 tokens: anchors 0 and 4 take 20, 5 over frames 1-3
    assert counts == [10, 2, 2, 1, 10] and sum(counts) == 25
    assert frame_counts(30, 5, 10) == [10, 4, 3, 3, 10]  # an int keep counts the video's tokens
    assert frame_counts(1.0, 6, 10) == [10] * 6  # keep=all: dense
    assert frame_counts(0.1, 6, 10) == [10, 0, 0, 0, 10, 0]  # below the anchors' share: anchors alone
    video = VisualItem(0, 0, "video", 40, 0, frames=(10, 10, 10, 10))
    image = VisualItem(1, 0, "image", 30, 0)
    assert DyCoke().item_count(0.5, video) == 20 and DyCoke().item_count(0.5, image) == 30
    assert DyCoke(k=0.7).item_count(1.0, video) == 10 + 3 * 3  # the authors' count ignores keep


def test_hand_made_clip_keeps_the_changed_patches_of_each_pruned_frame():
    basis = torch.eye(16)
    frames = basis[:4][None].repeat(6, 1, 1)  # 6 frames of 4 patches, all static ...
    frames[1, 2] = basis[8]  # ... patch 2 changes in frame 1 (against frame 0)
    frames[2, 1] = basis[9]  # ... patch 1 in frame 2 (against frame 0)
    frames[3, 1] = basis[9]  # frame 3 = frame 2 except patch 3 (against frame 2: patch 1 is static there)
    frames[3, 3] = basis[10]
    frames[5, 0] = basis[11]  # patch 0 in frame 5 (against the anchor frame 4)
    kept = merge_order(frames, [4, 1, 1, 1, 4, 1])
    assert kept.tolist() == [0, 1, 2, 3, 4 + 2, 8 + 1, 12 + 3, 16, 17, 18, 19, 20 + 0]
    frames[4, 2] = basis[12]  # an anchor keeps every patch whatever changed in it
    assert merge_order(frames, [4, 2, 0, 1, 4, 1]).tolist() == [0, 1, 2, 3, 4, 6, 12 + 3, 16, 17, 18, 19, 20]


def _clip(model, frames: int, redrawn: dict[int, list[tuple[int, int]]], size=(16, 24)) -> dict:
    """A Qwen video whose frames repeat frame 0's pixels, with the merged patches ``(patch, seed)`` of
    ``redrawn[f]`` redrawn in frame ``f`` (the same seed draws the same pixels)."""
    batch = make_batch(model, [[3, Video(frames, size), 4]])
    pixels = batch["pixel_values_videos"]
    per_frame = pixels.shape[0] // frames
    pixels = pixels[:per_frame].repeat(frames, 1)
    for frame, patches in redrawn.items():
        for patch, seed in patches:  # a merged token is 4 consecutive rows (its 2x2 patches)
            start = frame * per_frame + 4 * patch
            pixels[start : start + 4] = torch.randn(4, pixels.shape[1], generator=torch.Generator().manual_seed(seed))
    return {**batch, "pixel_values_videos": pixels}


def test_static_frame_pairs_keep_the_moving_patches():
    model = tiny_model("qwen2_vl")
    # frame 1: patch 13 moves (against frame 0); frame 2: patch 5 (against frame 0); frame 3 = frame 2 with patch 20
    # moved as well (against frame 2: only 20 changed); frame 4 is an anchor, frame 5 static against it
    redrawn = {1: [(13, 1)], 2: [(5, 2)], 3: [(5, 2), (20, 3)], 4: [(7, 4)], 5: [(7, 4)]}
    clip = _clip(model, 6, redrawn)  # 24 tokens a frame; anchors 0 and 4 whole, frames 1-3 and 5 one token each
    with vtprune.wrap(model, "dycoke", keep=52) as pruning:
        model(**clip)
    [kept] = pruning.last.stages[0].kept_per_item
    assert pruning.last.items[0]["frames"] == [24] * 6
    assert kept.numel() == 52
    assert kept[:24].tolist() == list(range(24)) and kept[24:27].tolist() == [24 + 13, 48 + 5, 72 + 20]
    assert kept[27:51].tolist() == list(range(96, 120))  # anchor frame 4 whole


@pytest.mark.parametrize("frames", [2, 6, 7, 8])
def test_selects_what_the_authors_ttm_selects_on_qwen2_5_vl_videos(frames):
    """With the authors' k and where their loops agree with ours (even T, the last quadruple's frame i + 2 beyond
    T - 1 or visited); T = 7: the authors drop frame 6, which we keep (pruned against frame 4); T = 8: their last
    quadruple is never visited, so they keep frame 6 whole where we prune it against frame 4."""
    model = tiny_model("qwen2_5_vl")
    batch = make_batch(model, [[3, Image((16, 16)), 2, Video(frames, (16, 24)), 3]])
    with vtprune.wrap(model, "dycoke", keep=1.0, k=0.7) as pruning:
        model(**batch)
    kept = pruning.last.stages[0].kept_per_item
    [video] = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
    assert kept[0].numel() == 16  # the image passes through
    reference = authors_ttm(video, 24, 0.7)
    ours = set(kept[1].tolist())
    if frames % 2:  # the only difference: frame 6's 7 tokens least similar to frame 4
        assert reference <= ours
        extra = ours - reference
        assert len(extra) == 7 and extra <= set(range(6 * 24, 7 * 24))
    elif frames == 8:
        assert ours <= reference
        missing = reference - ours
        assert len(missing) == 24 - 7 and missing <= set(range(6 * 24, 7 * 24))
    else:
        assert ours == reference


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "llava_onevision"])
def test_keep_all_equals_dense(family):
    model, batch, record = video_keep_all(family, "dycoke")
    assert record.stages[0].kept_per_item[-1].numel() == record.items[-1]["num_tokens"]
    with vtprune.wrap(model, "dycoke", keep=0.3) as pruning:  # and it prunes the video's later frames there
        model(**batch)
    item, kept = pruning.last.items[-1], pruning.last.stages[0].kept_per_item[-1]
    assert item["modality"] == "video" and len(item["frames"]) == 3
    assert kept[: item["frames"][0]].tolist() == list(range(item["frames"][0]))  # anchor frame 0 whole
    assert kept.numel() < item["num_tokens"]
    if family == "qwen2_vl":  # and generation without the decode stage (p=0) is the dense generation
        options = {"max_new_tokens": 3, "do_sample": False, **NO_SPECIAL}
        expected = model.generate(**batch, **options)
        with vtprune.wrap(model, "dycoke", keep=1.0, p=0.0):
            assert torch.equal(model.generate(**batch, **options), expected)


def test_llava_onevision_keeps_the_final_newline_out_of_the_frames():
    model = tiny_model("llava_onevision")
    batch = make_batch(model, [[3, Video(3), 4]])
    with vtprune.wrap(model, "dycoke", keep=0.5) as pruning:
        model(**batch)
    item, kept = pruning.last.items[0], pruning.last.stages[0].kept_per_item[0]
    per_frame = item["frames"][0]
    assert item["frames"] == [per_frame, per_frame, per_frame + 1]  # the newline ends the last frame
    assert kept.numel() == round(0.5 * 3 * per_frame) + 1
    assert kept[:per_frame].tolist() == list(range(per_frame)) and int(kept[-1]) == item["num_tokens"] - 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_clip_alone(padding_side):
    prompts = [[3, Video(3, (16, 24)), 4], [2, Image((16, 16)), 5, Video(5, (16, 16)), 2]]
    batch_equals_each_alone("qwen2_vl", "dycoke", prompts, padding_side, keep=0.4)


def test_decode_score_rechooses_on_attention_shift_only():
    method = DyCoke(threshold=0.9)
    video = SimpleNamespace(item=VisualItem(0, 0, "video", 4, 0, frames=(2, 2)), selectable=torch.ones(4, dtype=bool))
    image = SimpleNamespace(item=VisualItem(1, 0, "image", 2, 0), selectable=torch.ones(2, dtype=bool))
    state: dict = {}

    def step(attention: list[float]):
        vector = torch.tensor(attention)
        ctx = SimpleNamespace(
            state=state, items=[video, image], attention=lambda: None, per_item=lambda _: [vector, torch.ones(2)]
        )
        return method.decode_score(ctx)

    first = step([0.4, 0.3, 0.2, 0.1])
    assert torch.equal(first[0], torch.tensor([0.4, 0.3, 0.2, 0.1])) and first[1] is None  # first step: choose
    assert step([0.41, 0.29, 0.2, 0.1]) == [None, None]  # cosine above 0.9: reuse
    assert step([0.1, 0.1, 0.1, 0.7])[0] is not None  # attention shifted: choose again
    assert step([0.1, 0.1, 0.12, 0.68])[0] is None  # compared with the previous step's, not the last chosen


def masked_recomputation(model, pruning, batch: dict, sequences: torch.Tensor, steps: int, record) -> list:
    """Last-row logits of a frozen (same TTM) no-cache forward on the prompt plus the first ``s`` generated tokens,
    for each ``s < steps``, whose row of decode step ``t`` (sequence index prompt + t - 1) has the columns of the
    visual tokens step t's mask record hides masked in decoder layers ``first_layer ..``."""
    prompt = batch["input_ids"].shape[1]
    visual = visual_mask(batch)
    columns = [visual[b].nonzero().squeeze(1) for b in range(visual.shape[0])]
    layers = vtprune.adapter_for(model).decoder_layers
    masks = decode_masks(record)
    logits = []
    for step in range(steps):
        length = prompt + step
        full = {**batch, "input_ids": sequences[:, :length]}
        extra = length - prompt
        full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, extra, dtype=torch.long)], 1)
        full["mm_token_type_ids"] = torch.cat(
            [batch["mm_token_type_ids"], torch.zeros(2, extra, dtype=batch["mm_token_type_ids"].dtype)], 1
        )
        hidden = torch.zeros(len(layers), 2, length, length, dtype=torch.bool)  # in original sequence indices
        for mask in masks:
            if mask.step < step + 1:
                for b, gone in enumerate(mask.hidden):
                    hidden[mask.first_layer :, b, prompt + mask.step - 1, columns[b][gone]] = True
        rows: list = []

        def hook(index, rows=rows, hidden=hidden, length=length):
            def hide(module, args, kwargs):
                mask = kwargs["attention_mask"]
                index_rows = rows[0].clamp(min=0)  # each pruned row's original sequence index
                picked = hidden[index].gather(1, index_rows[:, :, None].expand(-1, -1, length))
                picked = picked.gather(2, index_rows[:, None, :].expand(-1, index_rows.shape[1], -1))
                fill = torch.finfo(mask.dtype).min
                kwargs["attention_mask"] = mask.masked_fill(picked[:, None, :, : mask.shape[-1]], fill)
                return args, kwargs

            return hide

        model(**full, use_cache=False)  # the engine's output_index maps the pruned rows to sequence indices
        rows.append(pruning.last.output_index)
        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            logits.append(model(**full, use_cache=False).logits[:, -1])
        finally:
            for handle in handles:
                handle.remove()
    return logits


@pytest.mark.parametrize("stable,threshold", [("reuse", 0.9), ("reuse", 1.0), ("dense", -1.0)])
def test_cached_generate_with_decode_masks_equals_recomputation(stable, threshold):
    model = tiny_model("qwen2_vl")
    batch = make_batch(model, [[3, Video(3, (16, 24)), 4], [2, Image((16, 16)), 3, Video(2, (16, 16)), 2]])
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padding
    steps = 5
    options = {"stable": stable, "threshold": threshold}
    with vtprune.wrap(model, "dycoke", keep=0.6, **options) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **NO_SPECIAL,
        )  # fmt: skip
        record = pruning.last
        masks = decode_masks(record)
        assert [m.step for m in masks] == list(range(1, steps)) and not record.decode_drops
        kept = [k.numel() for k in record.stages[0].kept_per_item]
        videos = [i for i, item in enumerate(record.items) if item["modality"] == "video"]
        for mask in masks:
            assert (mask.layer, mask.first_layer) == (0, 1)  # 3 of 28 layers on 4: layer 1, read in layer 0
            for i, gone in enumerate(mask.hidden_per_item):
                if i not in videos:
                    assert gone.numel() == 0  # images are never masked
                elif mask.chosen[i]:
                    assert gone.numel() == kept[i] - -(-kept[i] * 2 // 10)  # ceil(0.2 n) stay visible
                elif stable == "reuse":
                    assert torch.equal(gone, masks[mask.step - 2].hidden_per_item[i])
                else:
                    assert gone.numel() == 0  # the reference code: stable steps run unpruned
            if threshold == -1.0 and mask.step > 1:
                assert mask.chosen == [False] * len(kept)  # attention never "shifts": only step 1 chooses
            if threshold == 1.0:
                assert all(mask.chosen[i] for i in videos)  # every step a new choice
        model.set_attn_implementation("eager")
        with pruning.freeze():
            reference = masked_recomputation(model, pruning, batch, generated.sequences, steps, record)
            if stable == "dense":  # the masks matter: without them the recomputation differs from step 1 on
                unmasked = SimpleNamespace(decode_masks=[])
                plain = masked_recomputation(model, pruning, batch, generated.sequences, 2, unmasked)
                assert not torch.allclose(plain[1], generated.logits[1], atol=1e-4)
        model.set_attn_implementation("sdpa")
    for step in range(steps):
        assert_close(generated.logits[step], reference[step], rtol=1e-4, atol=1e-4)


def test_refusals_and_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="dycoke prunes videos .* takes no video input"):
        vtprune.wrap(tiny_model("llava"), "dycoke", keep=0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="budget_unit 'video', not 'frame'"):
        vtprune.wrap(model, "dycoke", keep=0.5, budget_unit="frame")
    bad = [("k", 1.0, "k must be"), ("p", 1.0, "p must lie"), ("threshold", 2.0, "threshold must lie"),
           ("stable", "never", "stable must be one of"), ("positions", "x", "positions must be one of")]  # fmt: skip
    for option, value, name in bad:
        with pytest.raises(ValueError, match=name):
            DyCoke(**{option: value})
    with pytest.raises(ValueError, match="dycoke: layer=0 is outside"):
        vtprune.wrap(model, "dycoke", keep=0.5, layer=0)
    with pytest.raises(ValueError, match="decode-time masks hide cached tokens .* linear_attention"):
        vtprune.wrap(tiny_model("qwen3_5"), "dycoke", keep=0.5)
    vtprune.wrap(tiny_model("qwen3_5"), "dycoke", keep=0.5, p=0.0).unwrap()  # TTM alone applies there
    with vtprune.wrap(model, "dycoke", keep=0.25) as pruning:
        config = pruning.config()
    assert config == {
        "method": "dycoke", "positions": "renumber", "k": None, "layer": None, "p": 0.8, "threshold": 0.9,
        "stable": "reuse", "keep": 0.25, "budget": "final", "budget_unit": "video", "family": "qwen_vl",
    }  # fmt: skip
    assert vtprune.Method.from_dict({"method": "dycoke", "k": 0.7}) == DyCoke(k=0.7)
    assert make_method("dycoke") == DyCoke()
