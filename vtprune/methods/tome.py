"""ToMe: merge similar tokens by bipartite soft matching in every block.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. Code: https://github.com/facebookresearch/ToMe

For timm / open_clip vision transformers. Between each block's attention and MLP, the rows are split alternately
into sets A and B; every A row finds its most similar B row (cosine of the block's keys averaged over heads); the
``r`` A rows with the best matches merge into their B rows (a mean weighted by size, the patches each row already
stands for), the others stay. Prefix rows ([CLS]) never merge. Attention adds ``log(size)`` to each key
("proportional attention", on by default as in the authors' timm patch). Budget: ``keep`` patch rows after the last
block, removed in equal steps (the authors' constant ``r``; ``r=`` sets it directly), never more than A can give.
Rows keep raster order (merged rows sit on their B row's slot); the authors concatenate unmerged A then B, which
changes nothing a [CLS] readout sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.core.registry import register_method
from vtprune.core.vit import ReduceContext, Reduced, ViTInfo, ViTMethod, even_schedule
from vtprune.kernels import merge_tokens


@register_method
@dataclass
class ToMe(ViTMethod):
    """Bipartite soft matching in every block from ``start`` on; ``r`` tokens per block overrides ``keep``."""

    name = "tome"
    summary = "bipartite soft matching: merge the most similar patch rows, block after block"
    paper = "Bolya et al., ICLR 2023"
    r: int | None = None
    start: int = 0
    proportional: bool = True

    def schedule(self, info: ViTInfo, keep: int) -> dict[int, int]:
        if not 0 <= self.start < info.depth:
            raise ValueError(f"tome: start must lie in [0, {info.depth - 1}] for this tower, got {self.start}")

        def most(alive: int) -> int:  # A holds ceil(rows / 2) rows, minus the prefix rows it holds
            return math.ceil((alive + info.prefix) / 2) - math.ceil(info.prefix / 2)

        if self.r is not None:
            if self.r < 0:
                raise ValueError(f"tome: r must be >= 0, got {self.r}")
            plan, alive = {}, info.patches
            for block in range(self.start, info.depth):
                alive -= min(self.r, most(alive))
                plan[block] = alive
            return plan
        return even_schedule(info.depth, self.start, info.patches, keep, cap=most)

    def reduce(self, ctx: ReduceContext) -> Reduced:
        batch, rows, _ = ctx.x.shape
        r = rows - ctx.prefix - ctx.target
        metric = ctx.keys.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a_rows = torch.arange(0, rows, 2, device=ctx.x.device)
        b_rows = torch.arange(1, rows, 2, device=ctx.x.device)
        scores = metric[:, a_rows] @ metric[:, b_rows].transpose(1, 2)
        scores[:, a_rows < ctx.prefix] = -math.inf
        scores[:, :, b_rows < ctx.prefix] = -math.inf
        best, match = scores.max(-1)  # [B, A]
        merged_a = best.argsort(-1, descending=True)[:, :r]
        survives = torch.ones(batch, rows, dtype=torch.bool, device=ctx.x.device)
        survives[torch.arange(batch, device=ctx.x.device)[:, None], a_rows[merged_a]] = False
        slot = survives.cumsum(1) - 1
        destination = slot.clone()
        targets = b_rows[match.gather(1, merged_a)]
        destination.scatter_(1, a_rows[merged_a], slot.gather(1, targets))
        slots = rows - r
        x = merge_tokens(ctx.x, destination, ctx.sizes, slots)
        sizes = ctx.sizes.new_zeros(batch, slots).scatter_add_(1, destination, ctx.sizes)
        origin = ctx.origin[survives].view(batch, slots)  # a merged row keeps its B row's place
        return Reduced(x, sizes, origin)
