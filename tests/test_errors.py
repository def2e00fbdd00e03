"""Every bad input raises a clear error naming the parameter and the allowed values, and leaves no hooks behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model
from vtprune.core.compat import output_cache


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"method": "nope", "keep": 4}, ValueError, r"unknown method 'nope'; registered methods: .*fastv.*random"),
        ({"method": 3, "keep": 4}, TypeError, r"method must be a registered name"),
        ({"method": "fastv", "keep": 0}, ValueError, r"keep must be an int >= 1 .* or a float in \(0, 1\]"),
        ({"method": "fastv", "keep": -3}, ValueError, r"keep must be an int >= 1"),
        ({"method": "fastv", "keep": 1.5}, ValueError, r"keep as a fraction must lie in \(0, 1\]"),
        ({"method": "fastv", "keep": 0.0}, ValueError, r"keep as a fraction must lie in \(0, 1\]"),
        ({"method": "fastv", "keep": float("nan")}, ValueError, r"keep as a fraction"),
        ({"method": "fastv", "keep": True}, TypeError, r"keep must be an int >= 1"),
        ({"method": "fastv", "keep": "64"}, TypeError, r"keep must be an int >= 1"),
        ({"method": "fastv", "keep": 4, "layer": 0}, ValueError, r"fastv: layer=0 is outside .* must lie in \[1, 3\]"),
        ({"method": "fastv", "keep": 4, "layer": 4}, ValueError, r"fastv: layer=4 is outside the model: .* 4 decoder"),
        ({"method": "random", "keep": 4, "layer": -1}, ValueError, r"random: layer=-1 .* must lie in \[0, 3\]"),
        ({"method": "uniform", "keep": 4, "layer": 2.0}, TypeError, r"uniform: layer must be an int"),
        ({"method": "fastv", "keep": 4, "depth": 2}, ValueError, r"fastv: unknown option\(s\) depth; allowed: layer, positions"),
        ({"method": "fastv", "keep": 4, "positions": "shift"}, ValueError, r"positions must be one of \('keep', 'renumber'\)"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_patch_nothing(model, kwargs, error, pattern):
    before = _hooks(model)
    with pytest.raises(error, match=pattern):
        vtprune.wrap(model, **kwargs)
    assert _hooks(model) == before
    assert not hasattr(model, "_vtprune_pruning")


@pytest.mark.parametrize("bad", [nn.Linear(2, 2), "a model", None])
def test_unsupported_models_list_the_supported_classes(bad):
    with pytest.raises(TypeError, match=r"unsupported model .*: vtprune.wrap supports LlavaForConditionalGeneration"):
        vtprune.wrap(bad, "random", keep=2)


def test_llama4_is_refused_with_the_reason():
    llama4 = type("Llama4ForConditionalGeneration", (nn.Module,), {})()  # its real classes are too big to build here
    with pytest.raises(TypeError, match=r"unsupported model Llama4ForConditionalGeneration \(Llama 4's chunked-attention"):
        vtprune.wrap(llama4, "random", keep=2)


def test_text_only_llm_is_unsupported():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match=r"unsupported model LlamaForCausalLM: .*Qwen2_5_VLForConditionalGeneration"):
        vtprune.wrap(llm, "random", keep=2)


def test_wrapping_twice_is_refused(model):
    pruning = vtprune.wrap(model, "random", keep=2)
    hooks = _hooks(model)
    try:
        with pytest.raises(ValueError, match=r"already wrapped by vtprune \(random, keep=2\); call .unwrap\(\)"):
            vtprune.wrap(model, "fastv", keep=2)
        with pytest.raises(ValueError, match="already wrapped"):
            vtprune.wrap(model.model, "fastv", keep=2)  # the base model inside it, too
        assert _hooks(model) == hooks
    finally:
        pruning.unwrap()


def test_failed_forward_leaves_no_state_behind(model):
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "fastv", keep=4) as pruning:
        with pytest.raises(ValueError, match=r"placeholder tokens but the vision encoder produced"):
            model(**_drop_one_placeholder(batch))
        assert pruning._engine.current is None
        model(**batch)
        assert pruning.seq_lens[-1] < batch["input_ids"].shape[1]


def _drop_one_placeholder(batch):
    """The batch with one image placeholder turned into text: one placeholder fewer than the image has features."""
    from vtprune.testing import IMAGE_TOKEN

    ids = batch["input_ids"].clone()
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    ids[0, first] = 5
    return {**batch, "input_ids": ids}


def test_decoding_with_a_mismatched_mask_is_refused(model):
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "random", keep=4):
        out = model(**batch, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match=r"attention_mask covers .* tokens but the pruned cache has seen"):
            model(input_ids=next_token, attention_mask=batch["attention_mask"], past_key_values=output_cache(out))


def test_static_cache_is_refused(model):
    from transformers import StaticCache

    batch = make_batch(model, samples_for("llava")[:1])
    cache = StaticCache(config=model.config.text_config, max_cache_len=256)
    with vtprune.wrap(model, "random", keep=4):
        with pytest.raises(ValueError, match=r"vtprune needs a DynamicCache .* cache_implementation='dynamic'"):
            model(**batch, past_key_values=cache)


def test_tokens_after_pruning_only_for_counts_known_early(model):
    with vtprune.wrap(model, "uniform", keep=0.25) as pruning:
        assert pruning.tokens_after_pruning(576) == 144
    with vtprune.wrap(model, "fastv", keep=64) as pruning:
        with pytest.raises(ValueError, match="fastv does not fix its token count"):
            pruning.tokens_after_pruning(576)


def test_freeze_needs_a_previous_forward(model):
    with vtprune.wrap(model, "random", keep=4) as pruning:
        with pytest.raises(RuntimeError, match="nothing to freeze"):
            with pruning.freeze():
                pass


def test_manual_decode_loop_without_generate(model):
    """A hand-written cached loop (no position_ids, growing mask) decodes like generate()."""
    batch = make_batch(model, samples_for("llava")[:2])
    with vtprune.wrap(model, "fastv", keep=4):
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0, suppress_tokens=[127])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model(**batch, position_ids=positions, use_cache=True)
        tokens, mask, cache = [], batch["attention_mask"], output_cache(out)
        next_position = positions[:, -1:]
        for _ in range(3):
            logits = out.logits[:, -1].clone()
            logits[:, 127] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            next_position = next_position + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=next_position, past_key_values=cache)
    generated = expected[:, batch["input_ids"].shape[1] :]
    assert torch.equal(torch.cat(tokens, 1), generated)
