"""transformers' CLIP vision tower (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``; LLaVA-1.5's
``model.vision_tower``) for ViT-side token reduction. The blocks are ``CLIPEncoderLayer``s: vtprune computes their
attention from ``q_proj`` / ``k_proj`` / ``v_proj`` with SDPA (CLIP's scale is the default ``head_dim ** -0.5``).

Inside LLaVA only the blocks up to the layer LLaVA reads (``vision_feature_layer``, usually the penultimate) feed
the LLM, so ``feature_blocks`` limits the reduction schedule to them; later blocks run on what is left.
``vtprune.wrap(llava, "tome", keep=64)`` does this (see ``vtprune.core.tower.TowerReduction``).
"""

from __future__ import annotations

from torch import Tensor, nn

from vtprune.core.vit import ViTAdapter, ViTInfo

CLASS_NAMES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer")


class HFClipViTAdapter(ViTAdapter):
    family = "hf_clip_vit"

    def __init__(self, model: nn.Module, feature_blocks: int | None = None) -> None:
        super().__init__(model, feature_blocks)
        self.tower = getattr(model, "vision_model", model)  # transformers 5 flattens CLIPVisionModel

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in CLASS_NAMES and type(model).__module__.startswith("transformers.")

    def blocks(self) -> list[nn.Module]:
        return list(self.tower.encoder.layers)

    def info(self) -> ViTInfo:
        config = self.tower.config
        side = config.image_size // config.patch_size
        return ViTInfo(self.family, self.depth(), side * side, 1, config.num_attention_heads)

    def check(self) -> None:
        for index, block in enumerate(self.blocks()):
            if type(block).__name__ != "CLIPEncoderLayer":
                raise TypeError(f"CLIP block {index} is a {type(block).__name__}; vtprune reproduces CLIPEncoderLayer")

    def qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.self_attn
        shape = (*normed.shape[:2], attn.num_heads, attn.head_dim)
        return tuple(getattr(attn, f"{p}_proj")(normed).view(shape).transpose(1, 2) for p in "qkv")  # type: ignore[return-value]

    def attention_out(self, block: nn.Module, heads_out: Tensor) -> Tensor:
        return block.self_attn.out_proj(heads_out)

    def pieces(self, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        return block.layer_norm1, nn.Identity(), block.layer_norm2, block.mlp, nn.Identity()
