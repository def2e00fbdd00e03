"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (ECCV 2024), https://github.com/pkunlp-icler/FastV.

At decoder layer K (default 2) the image tokens are ranked by the attention the last prompt token pays them in
layer K-1, averaged over heads (``query="last"``, the rule of the authors' code), or by the attention they receive
from all tokens on average (``query="all"``, the rule the paper's text describes; computed in chunks of query
rows, never as a full map), and only the top ones continue; the kept tokens keep their original positions, as in the authors'
``keep_indexs``. The attention row is recomputed from layer K-1's queries and keys, so the model runs with SDPA or
FlashAttention throughout. Works on every family (the signal is the LLM's own attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method


@register_method
@dataclass
class FastV(Method):
    """Prune before decoder layer ``layer`` by the last token's head-averaged attention in layer ``layer - 1``."""

    name = "fastv"
    summary = "last token's attention at layer K-1 ranks image tokens; drop the rest at layer K"
    paper = "Chen et al., ECCV 2024 (pkunlp-icler/FastV)"

    layer: int = 2
    query: str = "last"
    positions: str = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in ("last", "all"):
            raise ValueError(f"{self.name}: query must be 'last' (the code) or 'all' (the paper), got {self.query!r}")

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.check_layer(self.name, "layer", self.layer, minimum=1)
        return [Stage(layer=self.layer, attention_from=self.layer - 1, query=self.query)]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        return ctx.per_item(ctx.attention())
