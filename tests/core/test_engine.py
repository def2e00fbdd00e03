"""The engine on all four families: equivalences that must hold for any method at either pruning point."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    CONFIGS,
    FAMILIES,
    IDS,
    Image,
    Video,
    assert_batch_equals_each_sample_alone,
    extend_prompt,
    generate_matches_frozen_recomputation,
    inapplicable,
    is_mrope,
    make_batch,
    newline_tokens,
    pooled,
    samples_for,
    tiny_model,
    view_count,
    visual_counts,
    visual_mask,
    with_positions,
)
from vtprune.core.layout import VisualItem

# Random models may emit any id; keep placeholder/special ids out of generated text.
NO_SPECIAL = {"suppress_tokens": list(range(120, 128)), "pad_token_id": 0}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def _skip_inapplicable(request):
    """Skip (method, family) pairs the method itself refuses with its clear error (tested in test_errors)."""
    params = getattr(request.node, "callspec", None)
    if params is None:
        return
    method, family = params.params.get("method"), params.params.get("family")
    if method and family:
        reason = inapplicable(family, method, params.params.get("options") or {})
        if reason:
            pytest.skip(reason)


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
@pytest.mark.parametrize("keep", [1.0, 10_000])
@pytest.mark.filterwarnings("ignore:keep=10000 is at least")  # the point of this test: nothing is pruned
def test_keep_all_equals_dense(family, method, options, keep):
    if options.get("drop_all"):
        pytest.skip("todre drop_all=True removes every visual token at its late layer, whatever the budget")
    if method == "dycoke" and options.get("k") is not None:
        pytest.skip("dycoke with k set keeps the authors' int((1 - k) * N) per pruned frame, whatever the budget")
    if method == "dyvte" and options.get("layer") is not None:
        pytest.skip("dyvte's static exit removes every visual token at its layer, whatever the budget")
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, method, keep=keep, **options) as pruning:
        pruned = model(**batch).logits
    assert_close(pruned, dense)
    assert all(len(kept) == 3 for kept in pruning.kept)


def test_unwrap_restores_the_model(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    before = model(**batch).logits
    hooks_before = _hook_count(model)
    pruning = vtprune.wrap(model, "fastv", keep=3)
    assert _hook_count(model) > hooks_before
    assert not torch.equal(model(**batch).logits[:, -1], before[:, -1])
    pruning.unwrap()
    pruning.unwrap()  # idempotent
    assert _hook_count(model) == hooks_before
    assert not hasattr(model, "_vtprune_pruning") and not hasattr(model.model, "_vtprune_pruning")
    assert_close(model(**batch).logits, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.wrap(model, "random", keep=2):
            raise RuntimeError("boom")
    assert _hook_count(model) == hooks_before
    assert_close(model(**batch).logits, before, rtol=0, atol=0)
    vtprune.wrap(model, "uniform", keep=2).unwrap()  # wrapping again after unwrap is fine


@pytest.mark.parametrize("positions", ["renumber", "keep"])
@pytest.mark.parametrize("method", ["random", "uniform"])
def test_pre_llm_pruning_equals_born_short_prompt(family, method, positions):
    """Pruning before the LLM = the unwrapped model fed only the kept image tokens, with the same positions."""
    model = tiny_model(family)
    batch = with_positions(model, make_batch(model, samples_for(family)[:2]))
    with vtprune.wrap(model, method, keep=5, positions=positions) as pruning:
        pruned = model(**batch).logits
    record = pruning.last
    index = record.output_index
    valid = index >= 0

    vlm = model.model
    deepstack: dict[str, list] = {}  # Qwen3-VL: per layer, per image or video, like pooler_output
    if is_mrope(model):
        outputs = {"image": vlm.get_image_features(batch["pixel_values"], batch["image_grid_thw"])}
        if "pixel_values_videos" in batch:  # GLM-4V's samples have none
            outputs["video"] = vlm.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
        image = list(outputs["image"].pooler_output)
        video = list(outputs["video"].pooler_output) if "video" in outputs else []
        for modality, out in outputs.items():
            if getattr(out, "deepstack_features", None):
                deepstack[modality] = [list(layer) for layer in out.deepstack_features]
        full_positions, _ = vlm.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            batch["image_grid_thw"],
            batch.get("video_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
    else:
        pixel_inputs = {k: batch[k] for k in ("pixel_values", "image_sizes") if k in batch}
        image, video = list(vlm.get_image_features(**pixel_inputs).pooler_output), []
        if "pixel_values_videos" in batch:  # LLaVA-OneVision: [videos, N, D]
            video = list(vlm.get_video_features(batch["pixel_values_videos"]).pooler_output)
        full_positions = batch["position_ids"]
    kept = record.stages[0].kept_per_item
    image_sizes = [item["num_tokens"] for item in record.items if item["modality"] == "image"]
    if len(image) != len(image_sizes):  # InternVL: tiles, regrouped into images by the prompt's placeholder runs
        image = list(torch.cat(image).split(image_sizes))

    def kept_images(images: list) -> list:
        return [rows[k] for rows, k in zip(images, kept)]

    def kept_video(videos: list) -> list:  # one video, its frames are consecutive items
        frames = videos[0].split([item["num_tokens"] for item in record.items[len(image) :]])
        return [torch.cat([rows[k] for rows, k in zip(frames, kept[len(image) :])])]

    encoder_outputs = {"image": pooled(kept_images(image))}
    if video:
        encoder_outputs["video"] = pooled(kept_video(video))
        if not is_mrope(model):  # LLaVA-OneVision's forward takes one tensor
            encoder_outputs["video"].pooler_output = encoder_outputs["video"].pooler_output[0]
    for modality, layers in deepstack.items():
        keep_rows = kept_images if modality == "image" else kept_video
        encoder_outputs[modality]["deepstack_features"] = [tuple(keep_rows(layer)) for layer in layers]
    short_ids = batch["input_ids"].gather(1, index.clamp(min=0)).masked_fill(~valid, 0)
    short_mask = valid.long()
    if positions == "keep" or is_mrope(model):
        short_positions = full_positions.gather(-1, index.clamp(min=0).expand(*full_positions.shape[:-2], -1, -1))
    else:
        short_positions = (short_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {}
    if vtprune.adapter_for(model).encoder_output_layout == "tensor":  # Gemma 3, InternVL: one [N, D] tensor
        encoder_outputs["image"].pooler_output = torch.cat(encoder_outputs["image"].pooler_output)
    if "token_type_ids" in batch:  # Gemma 3: image tokens see their whole image
        extra["token_type_ids"] = batch["token_type_ids"].gather(1, index.clamp(min=0)).masked_fill(~valid, 0)
    born_short = model(
        input_ids=short_ids,
        attention_mask=short_mask,
        position_ids=short_positions,
        mm_encoder_outputs=encoder_outputs,
        **extra,
    ).logits
    assert valid.sum(1).max() < batch["input_ids"].shape[1]
    assert_close(pruned[valid], born_short[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
def test_cached_decoding_equals_recomputation_with_frozen_selection(family, method, options):
    if method == "dycoke" and options.get("p", 0.8) > 0:
        options = {**options, "p": 0.0}  # its decode-time masks hide tokens per decode row: test_dycoke.py checks them
    if method == "prunevid":  # its cut of the earlier layers' caches hides tokens from decode rows only
        options = {**options, "cut_earlier_caches": False}  # (test_prunevid.py / test_decode_drops.py check it)
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    with vtprune.wrap(model, method, keep=3, **options) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps=4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
def test_batch_equals_each_sample_alone(family, method, options, padding_side):
    assert_batch_equals_each_sample_alone(tiny_model(family), family, method, 4, padding_side, **options)


@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
def test_sdpa_equals_eager(family, method, options):
    results = []
    for implementation in ("sdpa", "eager"):
        model = tiny_model(family, attn_implementation=implementation)
        batch = with_positions(model, make_batch(model, samples_for(family)))
        with vtprune.wrap(model, method, keep=4, **options) as pruning:
            logits = model(**batch).logits
            real = pruning.last.output_index >= 0  # padding rows attend to nothing; kernels differ there
            results.append((logits[real], [[k.clone() for k in s] for s in pruning.kept]))
    assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for stage_sdpa, stage_eager in zip(results[0][1], results[1][1]):
        for a, b in zip(stage_sdpa, stage_eager):
            assert torch.equal(a, b)


def test_recomputed_attention_rows_equal_eager_attention_map(family):
    model = tiny_model(family, attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for(family)))
    layer = 2
    # hybrid models (Qwen3.5) return attention maps of their softmax-attention layers only
    types = vtprune.adapter_for(model).layer_types()
    index = sum(t != "linear_attention" for t in types[: layer - 1])
    attention = model(**batch, output_attentions=True).attentions[index].mean(1)  # [B, L, L] of layer - 1
    with vtprune.wrap(model, "fastv", keep=10_000, layer=layer) as pruning:
        model(**batch)
    record = pruning.last
    mask = batch["attention_mask"].bool()
    last = torch.where(mask, torch.arange(mask.shape[1]), -1).max(1).values
    visual = visual_mask(batch)
    scores = iter(record.stages[0].scores_per_item)
    for sample in range(mask.shape[0]):
        n_items = sum(1 for item in record.items if item["sample"] == sample)
        if n_items:
            ours = torch.cat([next(scores) for _ in range(n_items)])
            assert_close(ours, attention[sample, last[sample]][visual[sample]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
def test_sequence_lengths_and_kept_follow_the_budget(family, method, options):
    if method == "prunevid":
        pytest.skip("prunevid's merge keeps as many tokens as the clip's static / dynamic groups give (the authors' "
                    "ratios), not a budget; test_prunevid.py checks its counts")  # fmt: skip
    model = tiny_model(family)
    samples = samples_for(family)
    batch = make_batch(model, samples)
    seen: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
        for layer in vtprune.adapter_for(model).decoder_layers
    ]
    keep = 3
    with vtprune.wrap(model, method, keep=keep, **options) as pruning:
        model(**batch)
        stages = pruning._engine.stages  # the schedule the method declared
    for hook in hooks:
        hook.remove()
    record = pruning.last
    num_layers = len(vtprune.adapter_for(model).decoder_layers)

    # Per stage and image: round(scale * keep) tokens (per view with per-crop budgets; never more than the image
    # has), plus LLaVA-NeXT's newlines (always kept); a video keeps one budget over all its frames.
    def kept_at(stage) -> list[tuple[int, int]]:
        budget = round(stage.scale * keep)
        items = []
        for sample, prompt in enumerate(samples):
            for part in prompt:
                if isinstance(part, Image):
                    views = view_count(model, part) if stage.per_crop else 1
                    newlines = newline_tokens(model, part)
                    size = record.items[len(items)]["num_tokens"] - newlines
                    image_budgeted = stage.modalities is None or "image" in stage.modalities
                    image_budget = budget * views
                    if stage.budget_rule is not None:  # the method's own count (DyVTE's exit: none)
                        image_budget = stage.budget_rule(keep, VisualItem(0, sample, "image", size, 0))
                    items.append((sample, (min(image_budget, size) if image_budgeted else size) + newlines))
                elif isinstance(part, Video):  # one item, keep counting the whole video (budget_unit="video")
                    video_budgeted = stage.modalities is None or "video" in stage.modalities
                    entry = record.items[len(items)]
                    size = entry["num_tokens"]
                    # LLaVA-OneVision's newline after the last frame: structural, always kept
                    newline = int(not is_mrope(model))
                    count = min(budget, size - newline)
                    if stage.budget_rule is not None:  # the method's own count (EVS: vLLM's, frame 0 whole)
                        structural = torch.arange(size) >= size - newline
                        frames = tuple(entry["frames"])
                        video = VisualItem(0, sample, "video", size, 0, structural=structural, frames=frames)
                        count = min(size - newline, stage.budget_rule(keep, video))
                    items.append((sample, count + newline if video_budgeted else size))
        return items

    real = batch["attention_mask"].sum(1).tolist()
    visual = visual_counts(batch)
    expected_lengths, length = [], batch["input_ids"].shape[1]
    starts = {0 if stage.layer is None else stage.layer: stage for stage in stages}
    for index in range(num_layers):
        if index in starts:
            per_sample = [0] * len(samples)
            for sample, count in kept_at(starts[index]):
                per_sample[sample] += count
            length = max(r - v + k for r, v, k in zip(real, visual, per_sample))
        expected_lengths.append(length)
    assert seen == expected_lengths == pruning.seq_lens

    for stage, stage_record in zip(stages, record.stages):
        expected_items = kept_at(stage)
        assert [i["sample"] for i in record.items] == [s for s, _ in expected_items]
        for (sample, count), item, kept in zip(expected_items, record.items, stage_record.kept_per_item):
            assert kept.numel() == kept.unique().numel() == count
            assert kept.numel() == 0 or 0 <= int(kept.min()) and int(kept.max()) < item["num_tokens"]
        for sample, kept in enumerate(stage_record.kept):
            assert kept.numel() == kept.unique().numel() == sum(c for s, c in expected_items if s == sample)
            assert kept.numel() == 0 or int(kept.max()) < visual[sample]


@pytest.mark.parametrize("layer", [1, 2])
def test_in_llm_pruning_equals_dense_with_dropped_keys_masked(family, layer):
    """An in-LLM stage at ``layer`` = the dense model whose layers from ``layer`` on cannot attend to the dropped
    tokens (positions kept): checks the rebuilt masks and rotary tables, and whatever the family adds per visual
    token inside the layer loop (Qwen3-VL's deepstack features after layers 0 and 1) and Gemma 3's bidirectional
    image blocks. Gemma 3's sliding window spans the whole prompt here: windows count slots, so dropping tokens moves
    what a short window sees (the other tests cover short windows)."""
    model = tiny_model(family, attn_implementation="eager", sliding_window=4096)
    if "linear_attention" in vtprune.adapter_for(model).layer_types():
        pytest.skip("a linear-attention layer's recurrent state runs over the kept tokens; masking keys in the dense "
                    "model is not the same computation (the cached-decoding and batch tests cover it)")  # fmt: skip
    batch = with_positions(model, make_batch(model, samples_for(family)[:2]))
    with vtprune.wrap(model, "random", keep=3, layer=layer, positions="keep") as pruning:
        pruned = model(**batch).logits
    index = pruning.last.output_index
    valid = index >= 0
    kept = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for sample in range(kept.shape[0]):
        kept[sample, index[sample][valid[sample]]] = True
    dropped = batch["attention_mask"].bool() & ~kept
    assert dropped.any()

    def hide_dropped(module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(dropped[:, None, None, : mask.shape[-1]], torch.finfo(mask.dtype).min)
        return args, kwargs

    layers = vtprune.adapter_for(model).decoder_layers
    handles = [block.register_forward_pre_hook(hide_dropped, with_kwargs=True) for block in layers[layer:]]
    try:
        dense = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    rows = dense.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, dense.shape[-1]))
    assert_close(pruned[valid], rows[valid], rtol=1e-4, atol=1e-5)


def test_text_only_batches_pass_through(family):
    model = tiny_model(family)
    batch = make_batch(model, [[5], [3]])
    dense = model(**batch).logits
    expected = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with vtprune.wrap(model, "random", keep=1) as pruning:
        assert_close(model(**batch).logits, dense, rtol=0, atol=0)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0), expected)
    assert pruning.last is None


def test_labels_follow_the_kept_tokens(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with vtprune.wrap(model, "random", keep=2) as pruning:
        out = model(**batch, labels=labels)
    index = pruning.last.output_index
    kept_labels = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), kept_labels[:, 1:].flatten(), ignore_index=-100
    )
    assert out.logits.shape[1] == index.shape[1] < labels.shape[1]
    assert_close(out.loss, expected)


@dataclass
class _TwoStage(vtprune.Random):
    """A test-only progressive schedule: halve before the LLM, prune again at layer 2."""

    name = "two_stage_test"

    def stages(self, model, keep):
        return [vtprune.Stage(layer=None, scale=2.0), vtprune.Stage(layer=2)]


def test_progressive_schedule_with_two_stages(family):
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family))
    with vtprune.wrap(model, _TwoStage(), keep=2) as pruning:
        generated = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, **NO_SPECIAL
        )
        first, second = pruning.kept
        for before, after in zip(first[:2], second[:2]):
            assert torch.isin(after, before).all() and after.numel() < before.numel()
        lengths = pruning.seq_lens
        assert lengths[0] == lengths[1] > lengths[2] == lengths[3]
        with pruning.freeze():
            full = extend_prompt(batch, generated.sequences[:, : batch["input_ids"].shape[1] + 2], model)
            logits = model(**with_positions(model, full), use_cache=False).logits
    assert_close(logits[:, -1], generated.logits[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,options", [("fastv", {}), ("random", {})])
def test_beam_search_scores_equal_recomputation(family, method, options):
    """Beams share their prompt's selection; each returned beam's score is the log-likelihood under that selection."""
    model = tiny_model(family)
    batch = make_batch(model, samples_for(family)[:2])
    beams, steps = 3, 3
    suppressed = [2, *range(120, 128)]  # no EOS, no special ids
    with vtprune.wrap(model, method, keep=3, **options) as pruning:
        out = model.generate(
            **batch, num_beams=beams, num_return_sequences=beams, max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
            suppress_tokens=suppressed, pad_token_id=0,
        )
        expanded = {}
        for key, value in batch.items():
            if key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
                continue
            expanded[key] = value.repeat_interleave(beams, dim=0)
        expanded.update(_repeat_visual_inputs(batch, beams))
        with pruning.freeze():
            full = extend_prompt(expanded, out.sequences, model)
            logits = model(**with_positions(model, full), use_cache=False).logits
    logprobs = logits.log_softmax(-1)  # beam search normalises before the processors suppress tokens
    prompt = batch["input_ids"].shape[1]
    tokens = out.sequences[:, prompt:]
    # logits row j predicts token j + 1; the last `steps` + 1 rows cover the prompt's end and the generated tokens
    predicted = logprobs[:, -steps - 1 : -1].gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    assert_close(predicted, out.sequences_scores, rtol=1e-4, atol=1e-4)


def _repeat_visual_inputs(batch: dict, times: int) -> dict:
    """Each sample's pixel inputs repeated `times`, sample by sample, as generate() expands a batch."""
    from vtprune.testing import IMAGE_TOKEN, VIDEO_TOKEN

    groups = [("pixel_values", "image_grid_thw", IMAGE_TOKEN), ("pixel_values_videos", "video_grid_thw", VIDEO_TOKEN)]
    out = {}
    for pixels_key, grid_key, token in groups:
        if pixels_key not in batch:
            continue
        if grid_key in batch:  # Qwen: flattened patches, split by grid
            grids = batch[grid_key]
            units = list(batch[pixels_key].split(grids.prod(-1).tolist()))
            tokens_per_unit = (grids.prod(-1) // 4).tolist()
        else:  # LLaVA: one row per image, 64 tokens each
            units = list(batch[pixels_key].split(1))
            grids = None
            tokens_per_unit = [64] * len(units)
        counts = (batch["input_ids"] == token).sum(1).tolist()
        owners, sample = [], 0
        for tokens in tokens_per_unit:
            while counts[sample] == 0:
                sample += 1
            owners.append(sample)
            counts[sample] -= tokens
        order = [i for s in range(len(counts)) for _ in range(times) for i, o in enumerate(owners) if o == s]
        out[pixels_key] = torch.cat([units[i] for i in order])
        if grids is not None:
            out[grid_key] = grids[order]
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_models_loaded_with_from_pretrained_wrap_like_built_ones(family, tmp_path):
    """The path users take with real weights: save_pretrained / from_pretrained, then wrap."""
    from transformers import AutoModelForImageTextToText

    built = tiny_model(family)
    built.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    batch = make_batch(built, samples_for(family)[:2])
    results = []
    for model in (built, loaded):
        with vtprune.wrap(model, "fastv", keep=4) as pruning:
            results.append((model(**batch).logits, pruning.kept[0]))
    assert_close(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
