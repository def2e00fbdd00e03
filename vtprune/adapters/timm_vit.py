"""timm's plain ``VisionTransformer`` (``timm.create_model("vit_*")``) for ViT-side token reduction."""

from __future__ import annotations

from torch import Tensor, nn

from vtprune.core.vit import ViTAdapter, ViTInfo


class TimmViTAdapter(ViTAdapter):
    family = "timm_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("timm.")

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def info(self) -> ViTInfo:
        grid = self.model.patch_embed.grid_size
        return ViTInfo(self.family, self.depth(), grid[0] * grid[1], self.model.num_prefix_tokens,
                       self.model.blocks[0].attn.num_heads)  # fmt: skip

    def check(self) -> None:
        for index, block in enumerate(self.model.blocks):
            attn = block.attn
            custom_scale = abs(getattr(attn, "scale", attn.head_dim**-0.5) - attn.head_dim**-0.5) > 1e-12
            if type(block).__name__ != "Block" or getattr(attn, "gate", None) is not None or custom_scale:
                raise TypeError(f"timm block {index} is a {type(block).__name__} ({type(block.attn).__name__}); "
                                "vtprune reduces tokens in plain ViT Blocks with ungated, default-scaled Attention")  # fmt: skip
        if self.model.global_pool not in ("token", ""):
            # average or attention ('map') pooling over rows of unequal size would need size weights: [CLS] only
            raise ValueError(f"global_pool={self.model.global_pool!r}: ViT-side reduction supports 'token' pooling "
                             "(or '' for the rows themselves)")  # fmt: skip
        if getattr(self.model, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size towers are not supported: the token count must be fixed")

    def qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.attn
        batch, tokens, _ = normed.shape
        q, k, v = attn.qkv(normed).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    def attention_out(self, block: nn.Module, heads_out: Tensor) -> Tensor:
        return block.attn.proj_drop(block.attn.proj(block.attn.norm(heads_out)))

    def pieces(self, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        return block.norm1, block.ls1, block.norm2, block.mlp, block.ls2
