"""Where EntropyPrune's entropy collapse lies on a model: the visual tokens' query-state matrix entropy entering
every decoder layer, the layer of the largest drop, and a plot (a tool beside the method, so that the method itself
never needs a model adapter)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.api import adapter_for
from vtprune.core.compat import SOFTMAX_ATTENTION
from vtprune.core.signals import rotated_queries
from vtprune.methods.entropyprune import token_matrix_entropy


@dataclass
class CollapseReport:
    """Mean matrix entropy of the visual tokens' query states entering each decoder layer's attention (NaN for
    layers without softmax attention)."""

    entropy: list[float]
    collapse_layer: int
    plot: Path | None = None
    drops: list[float] = field(default_factory=list)


@torch.no_grad()
def capture_decoder_qk(
    model: nn.Module, adapter: Any, inputs: dict, keys: bool = False
) -> dict[int, dict[str, Tensor]]:
    """One forward of ``model`` on ``inputs`` with every decoder layer's ``q_proj`` output (``"q"``), its rotary
    tables (``"rotary"``) and, with ``keys``, its ``k_proj`` output (``"k"``) kept, by layer index: what the
    per-layer analyses (entropy collapse, AdaptInfer's inflection layers) recompute attention from."""
    captured: dict[int, dict[str, Tensor]] = {}

    def keep(index: int, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured.setdefault(index, {})[name] = output

        return hook

    def keep_rotary(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.setdefault(index, {})["rotary"] = kwargs["position_embeddings"]

        return hook

    hooks = []
    try:
        for index, layer in enumerate(adapter.decoder_layers):
            parts = adapter.decoder_parts(index)
            hooks.append(parts.query.register_forward_hook(keep(index, "q")))
            if keys:
                hooks.append(parts.key.register_forward_hook(keep(index, "k")))
            hooks.append(layer.register_forward_pre_hook(keep_rotary(index), with_kwargs=True))
        model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def find_collapse_layer(model: nn.Module, inputs: dict, plot: str | Path | None = None) -> CollapseReport:
    """Measure the visual tokens' per-token query entropy in every decoder layer and locate the collapse.

    The entropy collapse layer is the layer K whose entropy falls furthest below layer K-1's (the largest drop);
    EntropyPrune prunes at its input. ``inputs`` is a batch for ``model`` (e.g. from its processor); a PNG of the
    curve is written to ``plot`` if given.
    """
    adapter = adapter_for(model)
    layers = adapter.decoder_layers
    captured = capture_decoder_qk(model, adapter, inputs)

    visual = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for mask in adapter.input_placeholders(inputs).values():
        visual |= mask
    if not visual.any():
        raise ValueError("find_collapse_layer needs inputs with at least one image")
    # linear-attention layers (Qwen3.5's Gated DeltaNet) have no query states to measure: NaN there, and each
    # drop is taken from the previous softmax-attention layer
    measured = [i for i, layer_type in enumerate(adapter.layer_types()) if layer_type in SOFTMAX_ATTENTION]
    entropy, drops = [math.nan] * len(layers), [0.0] * len(layers)
    for index in measured:
        parts = adapter.decoder_parts(index)
        queries = rotated_queries(parts, captured[index]["q"], captured[index]["rotary"])
        entropy[index] = float(token_matrix_entropy(queries[visual]).mean())
    for previous, index in itertools.pairwise(measured):
        drops[index] = entropy[previous] - entropy[index]
    collapse = max(measured[1:], key=lambda i: drops[i]) if len(measured) > 1 else measured[0]
    report = CollapseReport(entropy, collapse, drops=drops)
    if plot is not None:
        report.plot = _plot_entropy(report, Path(plot), type(model).__name__)
    return report


def _plot_entropy(report: CollapseReport, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    measured = [i for i, value in enumerate(report.entropy) if not math.isnan(value)]
    axes.plot(measured, [report.entropy[i] for i in measured], marker="o")
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
