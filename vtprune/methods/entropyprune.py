"""EntropyPrune — "Matrix Entropy Guided Visual Token Pruning for Multimodal Large Language Models"
(arXiv 2602.17196), https://github.com/YahongWang1/EntropyPrune (code read at commit 9fc1cbb).

At the entropy-collapse layer K (K=2 on LLaVA-1.5 / LLaVA-NeXT, K=1 on Qwen2.5-VL, the authors' constants) each
image token is scored by the matrix entropy of its query states in layer K-1 (after RoPE): the token's
``heads x head_dim`` query matrix is centred over the heads, and the entropy of the spectrum of its
``heads x heads`` dual Gram matrix ``R R^T / heads`` (same non-zero spectrum as the ``head_dim x head_dim``
covariance, but up to (128/32)^3 = 64x cheaper to decompose) is ``-sum(l log l) / log(heads)`` over the eigenvalues
clamped at 1e-10 (not trace-normalised, as in the code). The highest-entropy tokens continue into layer K with their
original positions. Only query states are needed: SDPA / FlashAttention stay on. All families.

The paper budgets by the average number of visual tokens over all layers; pass ``budget="average"`` to
``vtprune.wrap`` for that accounting (``keep=192`` then keeps ``int((32*192 - 2*576) / 30) = 166`` after layer 2 of
LLaVA-1.5-7B). :func:`vtprune.eval.collapse.find_collapse_layer` measures where the visual tokens' entropy
collapses on a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# The authors pool head_dim down to this many columns before the entropy (a no-op for head_dim <= 128).
POOLED_HEAD_DIM = 128
DEFAULT_COLLAPSE_LAYER = {"qwen_vl": 1}


def token_matrix_entropy(queries: Tensor) -> Tensor:
    """Matrix entropy of each token's ``[heads, head_dim]`` query matrix, ``[..., heads, head_dim] -> [...]``.

    Computed on the dual ``heads x heads`` Gram matrix in float64, as the authors do.
    """
    heads, head_dim = queries.shape[-2:]
    group = head_dim // POOLED_HEAD_DIM
    x = queries.double()
    if group > 1:
        x = x[..., : group * POOLED_HEAD_DIM].unflatten(-1, (POOLED_HEAD_DIM, group)).mean(-1)
    centred = x - x.mean(dim=-2, keepdim=True)
    gram = centred @ centred.transpose(-1, -2) / heads
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(1e-10)
    return -(eigenvalues * eigenvalues.log()).sum(-1) / math.log(heads)


@register_method
@dataclass
class EntropyPrune(Method):
    """Keep the image tokens whose query states at layer ``layer - 1`` have the highest matrix entropy."""

    name = "entropyprune"
    summary = "matrix entropy of each token's query states at the entropy-collapse layer"
    paper = "arXiv 2602.17196 (YahongWang1/EntropyPrune)"

    layer: int | None = None
    positions: str = "keep"

    def collapse_layer(self, model: ModelInfo) -> int:
        return self.layer if self.layer is not None else DEFAULT_COLLAPSE_LAYER.get(model.family, 2)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layer = self.collapse_layer(model)
        model.check_layer(self.name, "layer", layer, minimum=1)
        return [Stage(layer=layer, states_from=layer - 1)]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        queries = ctx.query_states()
        return [token_matrix_entropy(queries[view.sample, view.slots]).float() for view in ctx.items]
