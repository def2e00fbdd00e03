"""Every adapter's module paths: the decoder parts it names are the modules each layer really runs, and its layer
types and vision shape describe the model."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import FAMILIES, Image, make_batch, tiny_model
from vtprune.adapters import adapter_class_for_config
from vtprune.eval.flops import model_shape
from vtprune.testing import GRID_FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_parts_are_the_modules_each_layer_runs(family):
    model = tiny_model(family)
    adapter = vtprune.adapter_for(model)
    calls: list[tuple[int, str]] = []
    handles = []
    for index in range(len(adapter.decoder_layers)):
        parts = adapter.decoder_parts(index)
        for name in ("attention", "query", "key", "input_norm", "mlp"):
            module = getattr(parts, name)
            handles.append(module.register_forward_hook(lambda *_, i=index, n=name: calls.append((i, n))))
    try:
        with torch.no_grad():
            model(**make_batch(model, [[2, Image(), 3]]))
    finally:
        for handle in handles:
            handle.remove()
    layers = len(adapter.decoder_layers)
    expected = {(i, n) for i in range(layers) for n in ("attention", "query", "key", "input_norm", "mlp")}
    assert set(calls) == expected
    declared = getattr(adapter.text_config, "layer_types", None) or ["full_attention"] * layers
    assert adapter.layer_types() == list(declared)
    if family == "gemma3":
        assert set(adapter.layer_types()) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_describes_its_tower_for_flops(family):
    model = tiny_model(family)
    assert adapter_class_for_config(model.config) is type(vtprune.adapter_for(model))
    vision = model_shape(model).vision
    assert vision.encoder_input == ("grid" if family in GRID_FAMILIES or family == "mistral3" else "views")
    assert vision.cls_token == (family in ("llava", "llava_next", "internvl"))  # SigLIP, Pixtral, Qwen: none
    assert vision.gated_mlp == (family in ("qwen2_5_vl", "mistral3", "glm4v")) and (vision.window > 0) == (family == "qwen2_5_vl")
    assert vision.projectors == (1 + len(model.config.vision_config.deepstack_visual_indexes) if family == "qwen3_vl" else 1)
    with pytest.raises(TypeError, match="no FLOPs model for 'bert'; supported: llava, llava_next, llava_onevision"):
        adapter_class_for_config(type("Config", (), {"model_type": "bert"})())
