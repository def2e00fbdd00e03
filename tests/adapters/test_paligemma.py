"""PaliGemma adapter: the prompt is a bidirectional prefix (``token_type_ids == 0``) in the rebuilt masks and in
recomputed attention rows, decoded tokens are a causal suffix, and PaliGemma 2's Gemma 2 decoder (sliding layers,
soft-capped logits; eager only) works too. (PaliGemma 1 runs every cross-family test.)"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import (
    Image,
    make_batch,
    samples_for,
    tiny_model,
    visual_mask,
    with_positions,
)


def _paligemma2():
    return tiny_model("paligemma", gemma2=True, attn_implementation="eager", sliding_window=8)


@pytest.mark.parametrize("gemma2", [False, True])
def test_recomputed_rows_see_the_whole_prefix(gemma2):
    """FastV's query="all" averages every prompt row: each row's keys are the whole prefix, not just the earlier
    tokens (and PaliGemma 2's logits are soft-capped first)."""
    model = tiny_model("paligemma", gemma2=gemma2, attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("paligemma")[:2]))
    attention = model(**batch, output_attentions=True).attentions[1].mean(1)  # [B, L, L] of layer 1
    with vtprune.wrap(model, "fastv", keep=10_000, layer=2, query="all") as pruning:
        model(**batch)
    mask, visual = batch["attention_mask"].bool(), visual_mask(batch)
    scores = iter(pruning.last.stages[0].scores_per_item)
    for sample in range(2):
        received = attention[sample][mask[sample]].mean(0)[visual[sample]]
        ours = torch.cat([next(scores) for _ in range(sample + 1)])
        assert_close(ours, received, rtol=1e-5, atol=1e-6)
    assert attention[0].triu(1).sum() > 0  # rows attend to later prompt tokens: not a causal map


def test_paligemma2_generate_over_a_sliding_window_equals_recomputation():
    model = _paligemma2()
    batch = make_batch(model, [[4, Image(), 6], [9, Image(), 2, Image(), 3]])
    with vtprune.wrap(model, "fastv", keep=3) as pruning:
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, suppress_tokens=list(range(120, 128)),
        )  # fmt: skip
        with pruning.freeze():
            prompt = batch["input_ids"].shape[1]
            full = {
                **batch,
                "input_ids": out.sequences[:, : prompt + 2],
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1),
                # generated tokens are the causal suffix
                "token_type_ids": torch.cat([batch["token_type_ids"], torch.ones(2, 2, dtype=torch.long)], 1),
            }
            mask = full["attention_mask"]
            logits = model(**full, position_ids=mask.cumsum(-1).clamp(min=1), use_cache=False).logits
    assert_close(logits[:, -1], out.logits[2], rtol=1e-4, atol=1e-4)


def test_without_token_types_the_prompt_is_causal_as_in_the_model():
    # eager: under SDPA transformers' PaliGemma runs a prompt without token types fully bidirectional (it passes
    # no mask and its attention is not causal), so only eager shows the causal prompt
    model = tiny_model("paligemma", attn_implementation="eager")
    typed = make_batch(model, [[4, Image(), 6]])
    untyped = {k: v for k, v in typed.items() if k != "token_type_ids"}
    assert vtprune.adapter_for(model).bidirectional_blocks(untyped, visual_mask(untyped)) is None
    with vtprune.wrap(model, "fastv", keep=3) as pruning:
        causal = model(**untyped).logits
        prefix = model(**typed).logits
        # the last token sees the whole prompt either way, so FastV keeps the same tokens; the layers differ
        assert torch.equal(pruning.kept[0][0], pruning.last.stages[0].kept_per_item[0])
    assert not torch.allclose(causal, prefix, atol=1e-3)
