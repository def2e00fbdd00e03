"""The MoE variants of Qwen3-VL and Qwen3.5 go through their dense siblings' adapters (same module paths)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model

NO_SPECIAL = {"suppress_tokens": list(range(120, 128)), "pad_token_id": 0}


def _moe_twin(family: str):
    """A tiny MoE model with the dense tiny model's sizes (4 experts, 2 per token)."""
    from transformers import (
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    config_class, model_class = {
        "qwen3_vl": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
        "qwen3_5": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration),
    }[family]
    dense = tiny_model(family).config.to_dict()
    text = {k: v for k, v in dense["text_config"].items() if k != "model_type"}
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    vision = {k: v for k, v in dense["vision_config"].items() if k != "model_type"}
    special = {k: dense[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    return model_class(config_class(text_config=text, vision_config=vision, **special)).eval()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_moe_variants_prune_and_decode_like_the_dense_ones(family):
    model = _moe_twin(family)
    batch = make_batch(model, samples_for(family))
    dense = model(**batch).logits
    with vtprune.wrap(model, "random", keep=1.0):
        assert_close(model(**batch).logits, dense)
    with vtprune.wrap(model, "fastv", keep=3) as pruning:
        out = model.generate(
            **batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True, **NO_SPECIAL
        )
        assert pruning.seq_lens[-1] < pruning.seq_lens[0]
        with pruning.freeze():
            prompt = batch["input_ids"].shape[1]
            full = {**batch, "input_ids": out.sequences[:, : prompt + 1]}
            ones = torch.ones(full["input_ids"].shape[0], 1, dtype=torch.long)
            full["attention_mask"] = torch.cat([batch["attention_mask"], ones], 1)
            full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], 0 * ones.int()], 1)
            logits = model(**full, use_cache=False).logits
    assert_close(logits[:, -1], out.logits[1], rtol=1e-4, atol=1e-4)
