"""EViT: keep the patches the [CLS] token attends to most, fuse the rest into one token.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022. Code: https://github.com/youweiliang/evit

For timm / open_clip vision transformers. At blocks 4, 7 and 10 of 12 (scaled to the tower's depth), between the
block's attention and its MLP, the head-averaged attention of [CLS] to the patch rows ranks them; the top ones stay
and the others become one fused row, their sum weighted by that attention (the authors' ``extra_token``, not
renormalised). Budget: ``keep`` patch rows after the last stage, the fused row included; each stage keeps the same
fraction (the authors' constant keep rate, 0.7 by default, is what ``keep`` = 0.343 of the patches gives).
Later stages rank the fused row like any other. Rows keep raster order (the fused row last); the [CLS] readout
is unaffected by order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.registry import register_method
from vtprune.core.vit import ReduceContext, Reduced, ViTInfo, ViTMethod
from vtprune.kernels import gather_tokens, merge_tokens

AUTHORS_BLOCKS = (3, 6, 9)  # 0-based, of 12 (DeiT-S)
REFERENCE_DEPTH = 12


@register_method
@dataclass
class EViT(ViTMethod):
    """[CLS]-attention top-k with a fused token, at ``blocks`` (0-based; default 3/6/9 of 12, scaled)."""

    name = "evit"
    summary = "[CLS]-attention top-k at a few blocks, the rest fused into one token"
    paper = "Liang et al., ICLR 2022"
    blocks: tuple[int, ...] | None = None
    fuse: bool = True

    def schedule(self, info: ViTInfo, keep: int) -> dict[int, int]:
        blocks = self.blocks if self.blocks is not None else tuple(
            sorted({min(info.depth - 1, round(b * info.depth / REFERENCE_DEPTH)) for b in AUTHORS_BLOCKS})
        )  # fmt: skip
        for block in blocks:
            if not 0 <= block < info.depth:
                raise ValueError(f"evit: blocks must lie in [0, {info.depth - 1}] for this tower, got {block}")
        if list(blocks) != sorted(set(blocks)):
            raise ValueError(f"evit: blocks must be increasing, got {blocks}")
        rate = (keep / info.patches) ** (1 / len(blocks))
        plan = {b: max(keep, round(info.patches * rate ** (i + 1))) for i, b in enumerate(blocks)}
        plan[blocks[-1]] = keep
        return plan

    def reduce(self, ctx: ReduceContext) -> Reduced:
        p = ctx.prefix
        attention = ctx.cls_attention()  # [B, M]
        patches, sizes, origin = ctx.x[:, p:], ctx.sizes[:, p:], ctx.origin[:, p:]
        kept = ctx.target - 1 if self.fuse else ctx.target
        top = attention.topk(kept, dim=-1).indices.sort(-1).values
        rows = [ctx.x[:, :p], gather_tokens(patches, top)]
        new_sizes = [ctx.sizes[:, :p], sizes.gather(1, top)]
        origins = [ctx.origin[:, :p], origin.gather(1, top)]
        if self.fuse:
            rest = torch.ones_like(attention, dtype=torch.bool).scatter(1, top, False)
            destination = torch.where(rest, 0, -1)
            weight = attention * rest
            mean = merge_tokens(patches, destination, weight, 1)  # attention-weighted mean of the rest
            rows.append(mean * weight.sum(-1, keepdim=True)[..., None].to(mean.dtype))  # -> the authors' sum
            new_sizes.append((sizes * rest).sum(-1, keepdim=True))
            # the fused row stands where its first member stood (never a kept row's place)
            origins.append(origin.masked_fill(~rest, origin.max() + 1).amin(-1, keepdim=True))
        return Reduced(torch.cat(rows, 1), torch.cat(new_sizes, 1), torch.cat(origins, 1))
