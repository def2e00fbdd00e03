"""The method registry: configs round trip through JSON, kinds, and which families each method refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vtprune
from tests.helpers import CONFIGS, FAMILIES, inapplicable


def test_method_configs_round_trip_through_json():
    configs = (
        vtprune.FastV(layer=3),
        vtprune.Random(seed=7, layer=1),
        vtprune.Uniform(positions="keep"),
        vtprune.TransPrune(prune_layers=(3, 5), ratios=(0.5, 0.25)),
        vtprune.MMTok(alpha=0.3),
    )
    for config in configs:
        data = json.loads(config.to_json())
        assert data["method"] == config.name
        assert vtprune.Method.from_dict(data) == config
    llm = [
        "adaptinfer", "atp", "catp", "dart", "divprune", "downsample", "dycoke", "dyvte", "entropyprune", "evs",
        "fastervlm", "fastv", "fastvid", "hiprune", "holitom", "infohorizon", "mmtok", "mustdrop", "pdrop", "pool",
        "prunevid", "random", "sparsevlm", "todre", "tokenflex", "transprune", "uniform", "vflowopt", "visiondrop",
        "visionzip", "vispruner", "vtc_cls", "zoo_prune",
    ]  # fmt: skip
    assert vtprune.list_methods("llm") == llm
    assert vtprune.list_methods("vit") == ["evit", "flowcut", "tome"]
    assert vtprune.list_methods("trained") == ["dtop"]
    assert vtprune.list_methods() == sorted([*llm, "evit", "flowcut", "tome", "dtop"])  # one registry, every kind
    assert vtprune.method_kind("tome") == "vit" and vtprune.method_kind("nope") is None
    with pytest.raises(ValueError, match=r"kind must be one of \['llm', 'trained', 'vit'\], got 'vlm'"):
        vtprune.list_methods("vlm")


def test_shared_configs_cover_every_llm_method():
    """Trained methods whose modules only exist for the embedded model (ATP-LLaVA, TokenFLEX) are tested there, in
    their own files; every other LLM-side method runs on every family's tiny model."""
    trained_only = {"atp", "tokenflex"}
    assert {method for method, _ in CONFIGS} == set(vtprune.list_methods("llm")) - trained_only
    for name in trained_only:
        assert vtprune.method_class(name).trained
        assert (Path(__file__).parents[1] / "methods" / f"test_{name}.py").exists()


def test_methods_refuse_exactly_the_families_they_cannot_serve():
    """The cross-cutting tests skip what a method refuses; this pins down what that is."""
    refused = {
        (method, family)
        for method, options in CONFIGS
        for family in FAMILIES
        if inapplicable(family, method, options)
    }
    # Qwen's and GLM's towers, SigLIP (also SmolVLM's) and Pixtral
    # (InternVL's tower has one, but its attention is not mapped onto pixel-shuffled tokens yet)
    no_cls = (
        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision", "gemma3", "mistral3", "internvl", "glm4v",
        "smolvlm", "paligemma",
    )  # fmt: skip
    expected = {(m, f) for m, _ in CONFIGS for f in no_cls if vtprune.method_class(m).needs_cls_token}
    # fixed-size views: a lower resolution gives as many tokens
    expected |= {
        ("downsample", f)
        for f in ("llava", "llava_next", "llava_onevision", "gemma3", "mistral3", "internvl", "smolvlm", "paligemma")
    }
    # where="before" needs a per-token projector (Qwen, GLM and Mistral 3 merge 2x2, InternVL and SmolVLM
    # pixel-shuffle, Gemma 3 pools 4x4);
    # LLaVA-OneVision's videos are pooled after its projector
    expected |= {
        ("pool", f)
        for f in (
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "mistral3", "internvl", "llava_onevision", "glm4v",
            "smolvlm",
        )  # fmt: skip
    }
    # HiPrune and VFlowOpt read the tower's attention of every query row, mapped onto tokens where the adapter can
    expected |= {
        (m, f) for m in ("hiprune", "vflowopt") for f in ("gemma3", "mistral3", "internvl", "smolvlm", "paligemma")
    }
    # ZOO-Prune perturbs each token's input to a per-token MLP projector: not where patches merge (Qwen, GLM,
    # Mistral 3, InternVL, SmolVLM, Gemma 3), nor PaliGemma's linear projector (the same sensitivity everywhere)
    expected |= {
        ("zoo_prune", f)
        for f in (
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "mistral3", "internvl", "glm4v", "smolvlm",
            "paligemma",
        )  # fmt: skip
    }
    # schedules that read attention at a linear-attention layer of the tiny hybrid (layers 0 and 2 are linear)
    expected |= {(m, "qwen3_5") for m in ("fastv", "transprune", "pdrop", "sparsevlm", "adaptinfer")}
    # the video methods reduce videos over time: families whose adapters take no video refuse them
    no_video = ("llava", "llava_next", "gemma3", "mistral3", "internvl", "smolvlm", "paligemma")
    expected |= {(m, f) for m in ("evs", "dycoke", "fastvid", "holitom", "prunevid") for f in no_video}
    # on Qwen3.5 DyCoke's decode-time masks refuse the linear-attention layers (p=0: TTM alone applies)
    expected.add(("dycoke", "qwen3_5"))
    assert refused == expected
    assert "no [CLS] token" in inapplicable("qwen2_vl", "vtc_cls", {})
    assert inapplicable("qwen2_vl", "pool", {}) is None  # only where="before" is refused
