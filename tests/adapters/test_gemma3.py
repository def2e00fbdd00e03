"""Gemma 3 adapter: sliding and full layers with their own rotary tables, bidirectional image blocks after
in-LLM pruning, and decoding over a sliding-window cache."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, make_batch, tiny_model


def test_rebuilt_masks_keep_each_image_bidirectional_and_rotary_follows_the_layer_type():
    model = tiny_model("gemma3", attn_implementation="eager")
    adapter = vtprune.adapter_for(model)
    hidden = torch.zeros(1, 6, 64)
    visual = torch.tensor([[False, True, True, False, True, True]])  # two images of two kept tokens each
    blocks = adapter.bidirectional_blocks({}, visual)
    assert blocks.tolist() == [[-1, 0, 0, -1, 1, 1]]
    masks = adapter.attention_masks(hidden, torch.ones(1, 6, dtype=torch.long), None, 1, blocks)
    allowed = masks["full_attention"][0, 0] == 0
    assert allowed[1, 2] and allowed[4, 5]  # an image token sees the later token of its image
    assert not allowed[2, 4] and not allowed[0, 1]  # but no later image and no text after
    positions = torch.arange(6)[None]
    sliding = adapter.rotary(hidden, positions, "sliding_attention")[0]
    full = adapter.rotary(hidden, positions, "full_attention")[0]
    assert not torch.allclose(sliding, full)  # theta 10k vs 1M


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_generate_over_a_sliding_window_cache_equals_recomputation(method):
    model = tiny_model("gemma3", sliding_window=8)  # far shorter than the prompt
    batch = make_batch(model, [[4, Image(), 6], [9, Image(), 2, Image(), 3]])
    with vtprune.wrap(model, method, keep=3, **({"layer": 1} if method == "random" else {})) as pruning:
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, suppress_tokens=list(range(120, 128)),
        )  # fmt: skip
        with pruning.freeze():
            prompt = batch["input_ids"].shape[1]
            ids = out.sequences[:, : prompt + 2]
            full = {
                **batch,
                "input_ids": ids,
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1),
                "token_type_ids": torch.cat([batch["token_type_ids"], torch.zeros(2, 2, dtype=torch.long)], 1),
            }
            mask = full["attention_mask"]
            logits = model(**full, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
    assert_close(logits[:, -1], out.logits[2], rtol=1e-4, atol=1e-4)


def test_merging_before_the_projector_is_refused():
    model = tiny_model("gemma3")
    with pytest.raises(ValueError, match="needs a per-token projector; Gemma 3's projector combines"):
        vtprune.wrap(model, "pool", keep=4, where="before")
    make_batch(model, [[2, Image(), 2]])
