"""open_clip's ``VisionTransformer`` (``model.visual`` of ``open_clip.create_model("ViT-*")``) for ViT-side token
reduction. The attention is ``nn.MultiheadAttention``; vtprune computes it from its packed projection with SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.core.vit import ViTAdapter, ViTInfo


class OpenClipViTAdapter(ViTAdapter):
    family = "open_clip_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("open_clip.")

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def info(self) -> ViTInfo:
        rows, cols = self.model.grid_size
        block = self.model.transformer.resblocks[0]
        return ViTInfo(self.family, self.depth(), rows * cols, 1, block.attn.num_heads)

    def check(self) -> None:
        if not self.model.transformer.batch_first:
            raise ValueError("open_clip towers built with batch_first=False are not supported")
        if self.model.attn_pool is not None or self.model.pool_type not in ("tok", "none"):
            raise ValueError(f"pool_type={self.model.pool_type!r}: ViT-side reduction supports [CLS] ('tok') pooling")
        for index, block in enumerate(self.blocks()):
            if not isinstance(block.attn, nn.MultiheadAttention):
                raise TypeError(f"open_clip block {index} uses {type(block.attn).__name__}; vtprune reproduces "
                                "nn.MultiheadAttention blocks only")  # fmt: skip
            if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity) or hasattr(block, "ln_1_kv"):
                raise TypeError(f"open_clip block {index} has a variant vtprune does not reproduce (ln_attn / ln_1_kv)")

    def qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.attn
        batch, tokens, width = normed.shape
        packed = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = packed.reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attention_out(self, block: nn.Module, heads_out: Tensor) -> Tensor:
        return block.attn.out_proj(heads_out)

    def pieces(self, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        return block.ln_1, block.ls_1, block.ln_2, block.mlp, block.ls_2
