"""The trained methods' mechanics on every family they claim: modules saved for each tiny model (seeded, untrained:
what is checked is how the engine applies their decisions, not their accuracy) run a padded batch exactly as each
sample alone, and greedy generation matches a frozen recomputation."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import (
    assert_batch_equals_each_sample_alone,
    generate_matches_frozen_recomputation,
    make_batch,
    samples_for,
    tiny_model,
)
from vtprune.api import model_info
from vtprune.core.weights import save_weights
from vtprune.methods.atp import AUTHORS_LAYERS, REFERENCE_DEPTH, ATPModules
from vtprune.methods.dyvte import ExitGates
from vtprune.methods.tokenflex import FlexProjector
from vtprune.testing import FAMILIES

# Qwen3.5's tiny hybrid has linear-attention layers where ATP's scores would be read
ATP_FAMILIES = [f for f in FAMILIES if f != "qwen3_5"]
FLEX_FAMILIES = ["llava", "llava_next"]  # a per-token projector to stand in for


def weights_for(model, method: str, folder) -> str:
    """Seeded, untrained modules of ``method`` whose metadata names this tiny model."""
    info = model_info(vtprune.adapter_for(model))
    meta = {"method": method, "family": info.family, "hidden_size": info.hidden_size, "num_layers": info.num_layers,
            "trained_on": f"the tiny {info.family}"}  # fmt: skip
    torch.manual_seed(0)
    if method == "atp":
        layers = info.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
        modules, meta = ATPModules(len(layers), 8), {**meta, "layers": layers, "width": 8}
        with torch.no_grad():  # thresholds near the scores' middle, so some tokens go and some stay
            for net in modules.stages:
                net.net[2].bias.copy_(torch.tensor([0.0, 0.0]))
    elif method == "dyvte":
        modules, meta = ExitGates(info.hidden_size, info.num_layers - 1, 8), {**meta, "width": 8}
    else:
        vision = model.config.vision_config.hidden_size
        widths = {"vision_width": vision, "hidden_width": 16, "text_width": info.hidden_size}
        modules, meta = FlexProjector(**widths), {**meta, **widths}
    return str(save_weights(folder / method, modules.state_dict(), meta))


CASES = [("atp", f) for f in ATP_FAMILIES] + [("dyvte", f) for f in FAMILIES]
CASES += [("tokenflex", f) for f in FLEX_FAMILIES]


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_trained_modules_batch_equals_each_sample_alone(method, family, tmp_path):
    model = tiny_model(family)
    keep = 4 if method == "tokenflex" else 0.5
    assert_batch_equals_each_sample_alone(model, family, method, keep, weights=weights_for(model, method, tmp_path))


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_trained_modules_generate_like_a_frozen_recomputation(method, family, tmp_path):
    model = tiny_model(family)
    weights = weights_for(model, method, tmp_path)
    batch = make_batch(model, samples_for(family))
    keep = 4 if method == "tokenflex" else 0.5
    with vtprune.wrap(model, method, keep=keep, weights=weights) as pruning:
        generate_matches_frozen_recomputation(model, batch, pruning, steps=3)


def test_the_untrained_modules_above_do_prune_each_sample_differently(tmp_path):
    """Guards the two tests above against passing on modules that keep everything."""
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava"))
    with vtprune.wrap(model, "atp", keep=0.5, weights=weights_for(model, "atp", tmp_path)) as pruning:
        model(**batch)
        counts = [int(kept.numel()) for kept in pruning.last.stages[0].kept]
    assert counts[0] != counts[1] and 0 < counts[0] < 64  # the third sample has no image
    with vtprune.wrap(model, "dyvte", keep=0.5, weights=weights_for(model, "dyvte", tmp_path)) as pruning:
        model(**batch)
        assert pruning.last.exit_layers() == [2, 1, None]


def test_atp_refuses_a_model_whose_scoring_layer_has_no_softmax_attention(tmp_path):
    model = tiny_model("qwen3_5")  # its tiny hybrid's layers 0 and 2 are linear attention
    with pytest.raises(ValueError, match="layer=1 has no softmax-attention layer before it"):
        vtprune.wrap(model, "atp", keep=0.5, weights=weights_for(model, "atp", tmp_path))
