"""Qwen3.5 adapter: a hybrid of linear-attention and gated full-attention layers."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import Image, make_batch, tiny_model


def test_attention_is_read_at_full_attention_layers_only():
    model = tiny_model("qwen3_5")  # layers: linear, full, linear, full
    with pytest.raises(ValueError, match=r"attention_from=0 is a linear_attention layer .* at or before 1: \[1\]"):
        vtprune.wrap(model, "fastv", keep=4, layer=1)
    with vtprune.wrap(model, "fastv", keep=4, layer=2) as pruning:  # attention of layer 1, pruned from layer 2
        model(**make_batch(model, [[3, Image((16, 24)), 5]]))
    assert pruning.seq_lens[:2] == [34, 34] and pruning.seq_lens[2:] == [14, 14]


def test_linear_layers_after_the_pruning_point_run_over_the_kept_tokens_only():
    """Pruning at layer 2 (linear) = running layers 2-3 of the dense model on the kept rows of layer 2's input."""
    model = tiny_model("qwen3_5")
    batch = make_batch(model, [[3, Image((16, 24)), 5]])
    with vtprune.wrap(model, "random", keep=4, layer=2) as pruning:
        pruned = model(**batch).logits
    index = pruning.last.output_index[0]
    entering: dict = {}
    layers = model.model.language_model.layers

    def keep_input(module, args, kwargs):
        entering.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=kwargs)
        raise StopIteration  # the dense forward is only needed up to layer 2's input

    handle = layers[2].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with pytest.raises(StopIteration):
            model(**batch)
    finally:
        handle.remove()
    hidden = entering["hidden"][:, index]
    cos, sin = entering["kwargs"]["position_embeddings"]
    tables = (cos[:, index], sin[:, index])
    for block in layers[2:]:
        hidden = block(hidden, position_embeddings=tables, attention_mask=None, position_ids=None)
    logits = model.lm_head(model.model.language_model.norm(hidden))
    torch.testing.assert_close(pruned, logits, rtol=1e-4, atol=1e-5)
