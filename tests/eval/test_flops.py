"""Analytical FLOPs against torch's FlopCounterMode, against the papers' own FLOPs claims, and the report API."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from tests.helpers import FAMILIES, Image, make_batch, tiny_model
from vtprune.core.budget import stage_budgets
from vtprune.core.compat import output_cache
from vtprune.eval.configs import REFERENCE_CONFIGS, meta_model
from vtprune.eval.flops import (
    model_shape,
    paper_layer_flops,
    prefill_flops,
    schedule_flops,
    schedule_tokens,
)


COUNTED = list(FAMILIES)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _recurrent_step_flops(model) -> int:
    """What FlopCounterMode misses when a Gated DeltaNet layer decodes one token: transformers' recurrent rule writes
    its three state products (S^T k, S^T q and the update k delta^T, dk x dv per value head each) as broadcast
    multiplies and sums. 0 for models without linear attention."""
    text = model.config.get_text_config()
    linear = list(getattr(text, "layer_types", None) or []).count("linear_attention")
    if not linear:
        return 0
    return linear * 3 * 2 * text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim


def _qwen3_5_moe():
    """The tiny Qwen3.5 with a MoE block in every layer (4 experts, 2 per token, a shared expert), its experts looped
    (``eager``): FlopCounterMode has no formula for the default ``grouped_mm`` and would count no routed expert."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    dense = tiny_model("qwen3_5").config.to_dict()
    text = {k: v for k, v in dense["text_config"].items() if k not in ("model_type", "intermediate_size")}
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    vision = {k: v for k, v in dense["vision_config"].items() if k != "model_type"}
    special = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    special = {k: dense[k] for k in special}
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision, **special))
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    return model.eval()


def _decode_flops(model, method: str, keep) -> tuple[float, int]:
    """(our FLOPs of one decoded token after a pruned prefill, FlopCounterMode's count of that step)."""
    batch = make_batch(model, [[5, Image((32, 48)), 7]])
    with vtprune.wrap(model, method, keep=keep) as pruning:
        out = model(**batch, use_cache=True)
        report = prefill_flops(model, pruning.last, pruning.last.encoder_inputs)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        extra = {"mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(token).int()], 1)} if "mm_token_type_ids" in batch else {}
        measured = _counted(lambda: model(input_ids=token, attention_mask=mask, past_key_values=output_cache(out), **extra))
    return report.decode_per_token, measured


@pytest.mark.parametrize("family", COUNTED)
@pytest.mark.parametrize("method,keep", [("random", 1.0), ("random", 8), ("fastv", 8)])
def test_prefill_flops_match_flop_counter_mode(family, method, keep):
    """Eager attention: FlopCounterMode has no formula for the CPU SDPA kernel."""
    model = tiny_model(family, attn_implementation="eager")
    batch = make_batch(model, [[5, Image((32, 48)), 7]])
    with vtprune.wrap(model, method, keep=keep) as pruning:
        measured = _counted(lambda: model(**batch))
        report = prefill_flops(model, pruning.last, pruning.last.encoder_inputs)
    # FastV's own scoring (one attention row) is the only work the analytical count leaves out
    assert math.isclose(report.prefill, measured, rel_tol=0.02)
    if method == "random":
        assert report.prefill == measured


@pytest.mark.parametrize("family", COUNTED)
def test_decode_flops_match_flop_counter_mode(family):
    model = tiny_model(family, attn_implementation="eager")
    ours, measured = _decode_flops(model, "fastv", 6)
    assert ours == measured + _recurrent_step_flops(model)


def test_qwen3_5_moe_flops_match_flop_counter_mode():
    """Router, routed experts (per token, whichever it picks) and the gated shared expert, prefill and decode."""
    model = _qwen3_5_moe()
    assert model_shape(model).language.experts is not None
    batch = make_batch(model, [[5, Image((32, 48)), 7]])
    for keep in (1.0, 8):
        with vtprune.wrap(model, "random", keep=keep) as pruning:
            measured = _counted(lambda: model(**batch))
            assert prefill_flops(model, pruning.last, pruning.last.encoder_inputs).prefill == measured
    ours, measured = _decode_flops(model, "fastv", 6)
    assert ours == measured + _recurrent_step_flops(model)


def test_qwen3_5_layers_by_kind():
    """A Gated DeltaNet layer decodes at a cost independent of the prompt (a fixed state, no keys), a gated
    full-attention layer's grows with its cache; layer=None is the mean layer (layers x it = the stack)."""
    language = model_shape(tiny_model("qwen3_5")).language
    assert language.linear_attention == (True, False, True, False) and language.gated_query
    assert language.layer_flops(1, 50, 0) == language.layer_flops(1, 5000, 0)
    assert language.layer_flops(1, 50, 1) < language.layer_flops(1, 5000, 1)
    stack = sum(language.layer_flops(300, 300, layer) for layer in range(language.layers))
    assert language.layers * language.layer_flops(300, 300) == pytest.approx(stack, rel=1e-12)


def test_full_size_configs_build_on_meta_without_weights():
    parameters = {}
    for name in REFERENCE_CONFIGS:
        model = meta_model(name)
        assert next(model.parameters()).device.type == "meta"
        parameters[name] = sum(p.numel() for p in model.parameters()) / 1e9
        assert model_shape(model).language.layers in (28, 32, 36, 40, 48)
    # Qwen3.5-9B (reconstructed, see vtprune/eval/configs.py): 9.41 B on meta with untied embeddings (0.46 B tower,
    # 7.94 B decoder, 1.02 B LM head); the model card's total is not checked here
    assert round(parameters["qwen3.5-9b"], 2) == 9.41
    # what meta builds from transformers' GLM-4.1V-9B defaults (0.89 B tower); the model card is not checked here
    assert round(parameters["glm-4.1v-9b"], 2) == 10.29
    language = model_shape(meta_model("qwen3.5-9b")).language
    assert language.linear_attention.count(True) == 24 and language.gated_query  # 3 Gated DeltaNet : 1 full
    assert round(parameters["llava-1.5-7b"], 2) == 7.06 and round(parameters["llava-1.5-13b"], 2) == 13.35
    assert round(parameters["qwen2-vl-7b"], 2) == 8.29
    # the model cards' totals: 8.77 B, 8.03 B, 12.2 B, 7.94 B
    assert round(parameters["internvl3-8b"], 2) == 7.94
    assert round(parameters["qwen3-vl-8b"], 2) == 8.77 and round(parameters["llava-onevision-7b"], 2) == 8.03
    assert round(parameters["gemma-3-12b"], 1) == 12.2
    assert model_shape(meta_model("gemma-3-12b")).language.windows.count(1024) == 40  # 5 sliding : 1 full


def _llm_reduction(name: str, text_tokens: int, schedule: list[tuple[int | None, int]]) -> float:
    language = model_shape(meta_model(name)).language
    dense = schedule_tokens(language.layers, text_tokens, 576, [])
    pruned = schedule_tokens(language.layers, text_tokens, 576, schedule)
    return 1 - sum(language.layer_flops(n, n) for n in pruned) / sum(language.layer_flops(n, n) for n in dense)


def test_fastv_paper_flops_reduction_on_llava_13b():
    """FastV (Chen et al., ECCV 2024, Sec. 4 and Fig. 1): "45% reduction in FLOPs for LLaVA-1.5-13B" with K=2, R=50%.

    Their per-layer estimate is 4nd^2 + 2n^2d + 2ndm (d=5120, m=13824, T=40 layers) with n -> n - R% x 576 after
    layer K. With n = 611 (LLaVA-1.5's 35-token system prompt + 576 image tokens, the prefix every prompt shares)
    it gives 45.4 %; our exact count (q/k/v/o, both attention products, the 3-matrix gated MLP) gives 45.2 %: the
    paper's 2-matrix MLP term is the only difference, and it moves the ratio by 0.2 points.
    """
    layer = lambda n: paper_layer_flops(n, 5120, 13824)  # noqa: E731
    paper = 1 - (2 * layer(611) + 38 * layer(611 - 288)) / (40 * layer(611))
    exact = _llm_reduction("llava-1.5-13b", 35, [(2, 288)])
    assert abs(paper - 0.45) < 0.02 and abs(exact - 0.45) < 0.02
    assert abs(paper - exact) < 0.005


def test_entropyprune_paper_flops_reduction_on_llava_7b():
    """EntropyPrune (arXiv 2602.17196, abstract): "68.2% reduction in FLOPs" on LLaVA-1.5-7B.

    Setting from its code (commit 9fc1cbb): K = 2, per-layer FLOPs 8nd^2 + 4n^2d + 6ndm over the real sequence, and
    the average-token budget save_num = int((L avg - K N) / (L - K)); 128 average tokens keep 98 after layer 2. With
    a 50-token question after the 35 + 576 prefix (the benchmarks' prompts are not in the paper) both their formula
    and our exact count give 68.3 %; they coincide because for Llama's multi-head attention the formula is exact.
    """
    kept = stage_budgets(128, 576, [(2, 1.0)], 32, "average")[0]
    assert kept == 98
    layer = lambda n: paper_layer_flops(n, 4096, 11008, gated=True)  # noqa: E731
    n = 35 + 576 + 50
    paper = 1 - (2 * layer(n) + 30 * layer(n - 576 + kept)) / (32 * layer(n))
    exact = _llm_reduction("llava-1.5-7b", 35 + 50, [(2, kept)])
    assert abs(paper - 0.682) < 0.02 and abs(exact - 0.682) < 0.02
    assert abs(paper - exact) < 1e-9


def test_report_rows_files_and_plot(tmp_path):
    model = tiny_model("llava")
    batch = make_batch(model, [[5, Image(), 7]])
    report = vtprune.report(model, batch, methods=["random", "fastv"], keep=[16, 4], repeats=1, warmup=0, new_tokens=2)
    assert [(r["method"], r["keep"]) for r in report.rows] == [
        ("dense", None), ("random", 16), ("random", 4), ("fastv", 16), ("fastv", 4),
    ]  # fmt: skip
    dense, random4 = report.rows[0], report.rows[2]
    assert dense["visual_tokens"] == 64 and random4["visual_tokens"] == 4
    assert random4["tflops_prefill"] < dense["tflops_prefill"] and random4["kv_cache_mb"] < dense["kv_cache_mb"]
    assert random4["predicted_speedup"] == pytest.approx(dense["tflops_prefill"] / random4["tflops_prefill"])
    assert json.loads(report.to_json(tmp_path / "r.json").read_text())["rows"][0]["method"] == "dense"
    assert (tmp_path / "r.csv").exists() is False and report.to_csv(tmp_path / "r.csv").read_text().startswith("method,")
    assert report.plot(tmp_path / "r.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        vtprune.report(model, batch, methods=["nope"], keep=[4])
    with pytest.raises(ValueError, match="keep must be"):
        vtprune.report(model, batch, methods=["random"], keep=[0])


@pytest.mark.parametrize(
    "family,method,keep,budget",
    [("llava", "fastv", 8, "final"), ("llava", "pdrop", 16, "final"), ("llava", "entropyprune", 12, "average"),
     ("qwen2_vl", "random", 10, "final"), ("qwen2_5_vl", "fastv", 0.25, "average"), ("qwen3_5", "fastv", 8, "final")],
)  # fmt: skip
def test_schedule_flops_equal_the_run_they_predict(family, method, keep, budget):
    """The what-if count from a method's schedule equals the count of the forward that really ran."""
    model = tiny_model(family)
    batch = make_batch(model, [[5, Image(), 7]])
    with vtprune.wrap(model, method, keep=keep, budget=budget) as pruning, torch.no_grad():
        model(**batch)
    record = pruning.last
    ran = prefill_flops(model, record, record.encoder_inputs, logits_rows=[1])
    image_tokens = record.items[0]["num_tokens"]
    predicted = schedule_flops(
        model, method, keep, budget=budget, text_tokens=record.input_length - image_tokens,
        image_tokens=None if family == "llava" else image_tokens,
    )  # fmt: skip
    assert predicted.layers == pytest.approx(ran.layers)
    for part in ("vision", "projector", "lm_head", "decode_per_token"):
        assert getattr(predicted, part) == pytest.approx(getattr(ran, part)), part


def test_schedule_flops_asks_for_what_it_cannot_infer():
    with pytest.raises(ValueError, match="image_tokens"):
        schedule_flops(meta_model("llava-next-7b"), "fastv", 64, text_tokens=40)
    with pytest.raises(ValueError, match="not a square"):
        schedule_flops(meta_model("qwen2-vl-7b"), "fastv", 64, text_tokens=40, image_tokens=300)
    full = schedule_flops(meta_model("llava-1.5-7b"), "fastv", 1.0, text_tokens=40)
    cut = schedule_flops(meta_model("llava-1.5-7b"), "fastv", 64, text_tokens=40)
    assert cut.vision == full.vision and cut.llm < full.llm and cut.decode_per_token < full.decode_per_token
