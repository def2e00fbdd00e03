"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with [CLS], MLP projector, Llama-style decoder.

Each image is one item of ``(image_size / patch_size)^2`` tokens on a square grid (576 = 24 x 24 for
LLaVA-1.5-7B). With ``vision_feature_select_strategy="full"`` the [CLS] feature precedes the grid and is kept
as a structural token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class LlavaAdapter(Adapter):
    family = "llava"
    display_name = "LLaVA-1.5"
    model_class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)
    # images per encoder call view: LLaVA-1.5 encodes one square view per image, LLaVA-NeXT a size-dependent number
    views_per_image: ClassVar[int] = 1
    tower_attention = True

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision, text = config.vision_config, config.get_text_config()
        selected = config.vision_feature_layer
        feature_layers = len(selected) if isinstance(selected, (list, tuple)) else 1
        return VisionShape(
            encoder_input="views",
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            image_size=vision.image_size,
            projector_in=vision.hidden_size * feature_layers,
            projector_hidden=text.hidden_size,
            projector_out=text.hidden_size,
            cls_token=True,
            fixed_views=cls.views_per_image,
        )

    def _image_features(self, inputs: dict[str, Any]) -> list[Tensor] | None:
        precomputed = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if precomputed is not None:
            return self.per_image_features(precomputed.pooler_output)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        output = self.call_with_supported(
            self.vlm.get_image_features,
            pixel_values=pixel_values,
            image_sizes=inputs.get("image_sizes"),
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            return_dict=True,
        )
        return self.per_image_features(output.pooler_output)

    def _patch_grid(self) -> int:
        vision = self.vlm.config.vision_config
        return vision.image_size // vision.patch_size

    def _select_strategy(self, inputs: dict[str, Any]) -> str:
        return inputs.get("vision_feature_select_strategy") or self.vlm.config.vision_feature_select_strategy

    def image_item(self, features: Tensor, inputs: dict[str, Any]) -> ItemSpec:
        num_tokens = features.shape[0]
        side = self._patch_grid()
        if num_tokens == side * side:
            return ItemSpec(0, num_tokens, (GridPart(0, side, side, side),))
        if num_tokens == side * side + 1 and self._select_strategy(inputs) == "full":
            structural = torch.zeros(num_tokens, dtype=torch.bool)
            structural[0] = True
            return ItemSpec(0, num_tokens, (GridPart(1, side, side, side),), structural)
        return ItemSpec(0, num_tokens)

    def _tower_layers(self) -> nn.ModuleList:
        tower = self.vlm.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattens CLIPVisionModel

    def _feature_hidden_state(self) -> int:
        """Index into the tower's hidden_states (embeddings first) of the features LLaVA projects."""
        selected = self.vlm.config.vision_feature_layer
        selected = selected[-1] if isinstance(selected, (list, tuple)) else selected
        return selected % (self.vision_depth() + 1)

    def vision_depth(self) -> int:
        return len(self._tower_layers())

    def vision_feature_layer(self) -> int:
        return self._feature_hidden_state() - 1

    def reducible_tower(self) -> tuple[nn.Module, int]:
        if type(self) is not LlavaAdapter:  # LLaVA-NeXT packs each view's rows onto its crop grid
            return super().reducible_tower()
        if isinstance(self.vlm.config.vision_feature_layer, (list, tuple)):
            raise ValueError("ViT-side methods need one vision_feature_layer; this LLaVA concatenates several")
        blocks = self._feature_hidden_state()  # hidden_states[h] is the output of block h - 1
        if blocks == 0:
            raise ValueError("vision_feature_layer reads the patch embeddings: no tower block to reduce in")
        return self.vlm.vision_tower, blocks

    def vision_attention(self, layer: int) -> nn.Module:
        return self._tower_layers()[layer].self_attn

    def vision_attention_segments(
        self, call: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[list[tuple[Tensor, Tensor]], float]:
        # each view ([CLS] + patches) attends to itself in full
        hidden = args[0] if args else kwargs["hidden_states"]
        views, rows, _ = hidden.shape
        queries = module.q_proj(hidden).view(views, rows, module.num_heads, -1).transpose(1, 2)
        keys = module.k_proj(hidden).view(views, rows, module.num_heads, -1).transpose(1, 2)
        return list(zip(queries.unbind(0), keys.unbind(0))), module.scale

    def vision_row_values(self, call: dict[str, Any], values: Tensor) -> Tensor:
        return values.view(-1, self._patch_grid() ** 2 + 1)

    def vision_pixel_patches(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, int]:
        pixels = args[0] if args else kwargs["pixel_values"]  # [views, C, H, W], one square view per row block
        size = self.vlm.config.vision_config.patch_size
        patches = pixels.unfold(2, size, size).unfold(3, size, size)  # [views, C, rows, cols, p, p]
        return patches.permute(0, 2, 3, 1, 4, 5).flatten(1, 2), int(self.has_cls_token)

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        side = self._patch_grid()
        per_view = side * side + 1  # [CLS] first
        views = call["pixel_values"].shape[0]
        first = 0 if self._select_strategy(call) == "full" else 1
        positions = torch.arange(first, per_view)
        return [view * per_view + positions for view in range(views)], per_view

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        selected = call.get("vision_feature_layer") or self.vlm.config.vision_feature_layer
        layers = selected if isinstance(selected, (list, tuple)) else [selected]
        hidden = output.hidden_states
        if hidden is None or any(hidden[layer] is None for layer in layers):
            return None
        return torch.cat([hidden[layer] for layer in layers], dim=-1)

    def project(self, features: Tensor) -> Tensor:
        return self.vlm.multi_modal_projector(features)

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        features = self._image_features(inputs)
        if features is None:
            return []
        return [VisualChunk("image", rows, [self.image_item(rows, inputs)]) for rows in features]
