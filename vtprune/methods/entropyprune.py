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
LLaVA-1.5-7B). :func:`find_collapse_layer` measures where the visual tokens' entropy collapses on a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method
from vtprune.core.signals import rotated_queries

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


@dataclass
class CollapseReport:
    """Mean matrix entropy of the visual tokens' query states entering each decoder layer's attention."""

    entropy: list[float]
    collapse_layer: int
    plot: Path | None = None
    drops: list[float] = field(default_factory=list)


@torch.no_grad()
def find_collapse_layer(model: nn.Module, inputs: dict, plot: str | Path | None = None) -> CollapseReport:
    """Measure the visual tokens' per-token query entropy in every decoder layer and locate the collapse.

    The entropy collapse layer is the layer K whose entropy falls furthest below layer K-1's (the largest drop);
    EntropyPrune prunes at its input. ``inputs`` is a batch for ``model`` (e.g. from its processor); a PNG of the
    curve is written to ``plot`` if given.
    """
    from vtprune.api import adapter_for  # the public entry point, so methods never import adapters

    adapter = adapter_for(model)
    layers = adapter.decoder_layers
    captured: dict[int, dict[str, Tensor]] = {}

    def keep_query(index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured.setdefault(index, {})["q"] = output

        return hook

    def keep_rotary(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.setdefault(index, {})["rotary"] = kwargs["position_embeddings"]

        return hook

    hooks = []
    try:
        for index, layer in enumerate(layers):
            hooks.append(layer.self_attn.q_proj.register_forward_hook(keep_query(index)))
            hooks.append(layer.register_forward_pre_hook(keep_rotary(index), with_kwargs=True))
        model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    visual = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for mask in adapter.placeholder_masks(inputs["input_ids"], None).values():
        visual |= mask
    if not visual.any():
        raise ValueError("find_collapse_layer needs inputs with at least one image")
    entropy = []
    for index in range(len(layers)):
        queries = rotated_queries(layers[index].self_attn, captured[index]["q"], captured[index]["rotary"])
        entropy.append(float(token_matrix_entropy(queries[visual]).mean()))
    drops = [0.0] + [entropy[i - 1] - entropy[i] for i in range(1, len(entropy))]
    collapse = max(range(1, len(entropy)), key=lambda i: drops[i]) if len(entropy) > 1 else 0
    report = CollapseReport(entropy, collapse, drops=drops)
    if plot is not None:
        report.plot = _plot_entropy(report, Path(plot), type(model).__name__)
    return report


def _plot_entropy(report: CollapseReport, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(len(report.entropy)), report.entropy, marker="o")
    axes.axvline(report.collapse_layer, color="tab:red", linestyle="--", label=f"collapse: layer {report.collapse_layer}")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("mean token matrix entropy (query states)")
    axes.set_title(f"Visual-token entropy per layer - {title}")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
