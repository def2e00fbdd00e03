"""Model-family adapters: one file per family, each knowing module paths, image spans and positions."""

from __future__ import annotations

from torch import nn

from vtprune.adapters.gemma3 import Gemma3Adapter
from vtprune.adapters.glm4v import Glm4vAdapter
from vtprune.adapters.hf_clip_vit import HFClipViTAdapter
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.adapters.mistral3 import Mistral3Adapter
from vtprune.adapters.open_clip_vit import OpenClipViTAdapter
from vtprune.adapters.paligemma import PaliGemmaAdapter
from vtprune.adapters.qwen3_5 import Qwen3_5Adapter
from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.adapters.qwen_vl import QwenVLAdapter
from vtprune.adapters.smolvlm import SmolVLMAdapter
from vtprune.adapters.timm_vit import TimmViTAdapter
from vtprune.core.adapter import Adapter
from vtprune.core.vit import ViTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, QwenVLAdapter, Qwen3VLAdapter, Qwen3_5Adapter,
    Gemma3Adapter, Mistral3Adapter, InternVLAdapter, Glm4vAdapter, SmolVLMAdapter, PaliGemmaAdapter,
)


VIT_ADAPTERS: tuple[type[ViTAdapter], ...] = (TimmViTAdapter, OpenClipViTAdapter, HFClipViTAdapter)


def find_vit_adapter(model: object) -> ViTAdapter | None:
    """The ViT adapter for a timm / open_clip / transformers CLIP vision transformer, else None."""
    for adapter in VIT_ADAPTERS:
        if isinstance(model, nn.Module) and adapter.matches(model):
            return adapter(model)
    return None


def supported_model_classes() -> list[str]:
    vits = ["timm VisionTransformer", "open_clip VisionTransformer (model.visual)", "transformers CLIPVisionModel"]
    return [name for adapter in ADAPTERS for name in adapter.model_class_names] + vits


def adapter_class_for_config(config: object) -> type[Adapter]:
    """The adapter class of a model config's family (by ``model_type``), or a TypeError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for adapter in ADAPTERS for t in adapter.model_types)
    raise TypeError(f"no FLOPs model for {model_type!r}; supported: {supported}")


# families people ask for that are known not to work yet, and why (said in the "unsupported model" error)
NOT_YET = {
    "Llama4": "Llama 4's chunked-attention layers have no mask builder here and some of its layers have no RoPE",
}


def find_adapter(model: object) -> Adapter:
    """The adapter for ``model``, or a TypeError listing the supported model classes."""
    if isinstance(model, nn.Module):
        for adapter in ADAPTERS:
            if adapter.matches(model):
                return adapter(model)
    name = type(model).__name__
    reason = next((f" ({why})" for prefix, why in NOT_YET.items() if name.startswith(prefix)), "")
    raise TypeError(f"unsupported model {name}{reason}: vtprune.wrap supports {', '.join(supported_model_classes())}")


__all__ = ["ADAPTERS", "VIT_ADAPTERS", "Adapter", "adapter_class_for_config", "find_adapter", "find_vit_adapter", "supported_model_classes"]
