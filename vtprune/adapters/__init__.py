"""Model-family adapters: one file per family, each knowing module paths, image spans and positions."""

from __future__ import annotations

from torch import nn

from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.adapters.qwen_vl import QwenVLAdapter
from vtprune.core.adapter import Adapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter)


def supported_model_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_class_names]


def find_adapter(model: object) -> Adapter:
    """The adapter for ``model``, or a TypeError listing the supported model classes."""
    if isinstance(model, nn.Module):
        for adapter in ADAPTERS:
            if adapter.matches(model):
                return adapter(model)
    raise TypeError(
        f"unsupported model {type(model).__name__}: vtprune.wrap supports {', '.join(supported_model_classes())}"
    )


__all__ = ["ADAPTERS", "Adapter", "find_adapter", "supported_model_classes"]
