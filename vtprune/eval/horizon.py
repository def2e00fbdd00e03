"""The information horizon (Wang et al., arXiv 2512.07580): leave-one-out information of each visual token per
decoder layer, and the layer past which it vanishes, where :class:`vtprune.methods.infohorizon.InfoHorizon`'s random
stage belongs. Like :mod:`vtprune.eval.collapse`, a tool that runs a whole model (methods do not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.api import adapter_for, wrap
from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage

# ours: the horizon is where the mean information falls below this fraction of the first measured layer's
HORIZON_THRESHOLD = 0.1


@dataclass
class HorizonReport:
    """Leave-one-out information of one prompt's visual tokens per decoder layer.

    ``information[j, t]`` is ``KL(p_full || p_without)`` (nats) between the next-token distributions at the prompt's
    last position of the dense model and of the model with visual token ``tokens[t]`` (the prompt's visual-token
    numbering, as ``Pruning.kept``) dropped from decoder layer ``layers[j]`` on. ``mean`` / ``max`` are per layer over
    the measured tokens; ``horizon_layer`` is the first measured layer whose mean falls below ``threshold`` times the
    first measured layer's (None: none does).
    """

    layers: list[int]
    tokens: list[int]
    information: Tensor
    mean: list[float]
    max: list[float]
    threshold: float
    horizon_layer: int | None
    plot: Path | None = None


def horizon_of(layers: Sequence[int], mean: Sequence[float], threshold: float = HORIZON_THRESHOLD) -> int | None:
    """The first of ``layers`` whose mean information falls below ``threshold`` times the first layer's."""
    if len(layers) != len(mean) or not layers:
        raise ValueError(f"horizon_of: needs one mean per layer, got {len(layers)} layers and {len(mean)} means")
    reference = mean[0]
    for layer, value in zip(layers, mean):
        if value < threshold * reference:
            return layer
    return None


@dataclass
class _DropOne(Method):
    """Measurement tool (not registered): at decoder layer ``layer`` sample b drops its visual token ``drop[b]``
    (the prompt's visual-token numbering; -1 or absent: none), every other token keeping its position; every
    selectable token seen is noted in ``seen`` as ``(sample, item tokens)``."""

    name: ClassVar[str] = "infohorizon-drop-one"

    layer: int = 0
    drop: tuple[int, ...] = ()
    positions: str = "keep"
    # shared with the engine's copy of this config (dataclasses.replace copies the reference)
    seen: list = field(default_factory=list, compare=False, repr=False)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.check_layer("find_horizon", "layer", self.layer)
        return [Stage(layer=self.layer)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        selections = []
        for view in ctx.items:
            members = view.selectable.nonzero().squeeze(1)
            numbers = view.item.visual_offset + view.tokens[members]
            self.seen.append((view.sample, numbers.cpu()))
            target = self.drop[view.sample] if view.sample < len(self.drop) else -1
            selections.append(members[numbers != target])
        return selections


def _repeat(inputs: dict[str, Any], copies: int) -> dict[str, Any]:
    """``copies`` copies of a one-prompt batch: every tensor concatenated along its first dimension (per-sample
    tensors [1, ...] become [copies, ...]; per-image tensors such as pixel_values or image_grid_thw list every
    copy's images in order), M-RoPE position ids ([3 or 4, 1, L]) along the batch dimension."""
    repeated: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            dim = 1 if key == "position_ids" and value.ndim == 3 else 0
            repeated[key] = torch.cat([value] * copies, dim=dim)
        elif value is None or isinstance(value, (bool, int, float, str)):
            repeated[key] = value
        else:
            raise ValueError(
                f"find_horizon: cannot batch input {key!r} of type {type(value).__name__}; pass tensors (a processor's "
                "return_tensors='pt' output)"
            )
    return repeated


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def find_horizon(
    model: nn.Module,
    inputs: dict[str, Any],
    plot: str | Path | None = None,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    *,
    threshold: float = HORIZON_THRESHOLD,
    batch_size: int = 8,
    seed: int = 0,
) -> HorizonReport:
    """Leave-one-out information of each visual token at each decoder layer of ``model`` on one prompt.

    For layer l and visual token i the model runs with token i's hidden state dropped at the input of layer l
    (through vtprune's engine, so masks, positions and every family's specifics are the ones pruning uses; the other
    tokens keep their positions); the information is ``KL(p_full || p_without_i)`` between the next-token
    distributions at the prompt's last position. Removals are batched: ``batch_size`` copies of the prompt per
    forward, each missing a different token. ``inputs`` is a one-prompt batch with at least one image (e.g. from
    the model's processor); ``layers`` defaults to every decoder layer; ``max_tokens`` measures a seeded random
    subset of the visual tokens (``seed``) to bound the cost (``len(layers) x tokens / batch_size`` forwards). A PNG
    of the per-layer mean and max is written to ``plot`` if given.
    """
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError("find_horizon: inputs must be one prompt (input_ids of shape [1, L]); call it per prompt")
    if not 0 < threshold < 1:
        raise ValueError(f"find_horizon: threshold must lie in (0, 1), got {threshold}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"find_horizon: batch_size must be an int >= 1, got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(
            f"find_horizon: max_tokens must be None (every visual token) or an int >= 1, got {max_tokens!r}"
        )
    depth = len(adapter_for(model).decoder_layers)
    layers = list(range(depth)) if layers is None else [int(layer) for layer in layers]
    if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < depth:
        raise ValueError(
            f"find_horizon: layers must be increasing decoder layers in [0, {depth - 1}] (the model has {depth}), "
            f"got {layers}"
        )
    # only the last position's logits are read (a [copies, L, vocab] tensor would dwarf the model's activations)
    inputs = {**inputs, "use_cache": False, "logits_to_keep": 1}

    log_full = model(**inputs).logits[0, -1].double().log_softmax(-1)
    # which visual tokens can be dropped: the engine's view of the prompt (structural tokens such as LLaVA-NeXT's
    # row separators never are; an image's only token cannot be dropped either, the engine keeps one per image)
    probe = _DropOne(layer=layers[0])
    with wrap(model, probe, keep=1.0) as pruning:
        model(**inputs)
    if pruning.last is None:
        raise ValueError("find_horizon needs inputs with at least one image")
    candidates = sorted(int(t) for _, numbers in probe.seen if numbers.numel() > 1 for t in numbers)
    if not candidates:
        raise ValueError("find_horizon: the prompt has no visual token that can be dropped")
    tokens = candidates
    if max_tokens is not None and max_tokens < len(candidates):
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(candidates), generator=generator)[:max_tokens].sort().values
        tokens = [candidates[i] for i in chosen.tolist()]

    information = torch.zeros(len(layers), len(tokens), dtype=torch.float64)
    for row, layer in enumerate(layers):
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start : start + batch_size]
            with wrap(model, _DropOne(layer=layer, drop=tuple(chunk)), keep=1.0):
                logits = model(**_repeat(inputs, len(chunk))).logits[:, -1]
            # in float64: deep layers' divergences are tiny differences of log-probabilities
            information[row, start : start + len(chunk)] = _kl(log_full, logits.double().log_softmax(-1)).cpu()

    mean = information.mean(1).tolist()
    peak = information.max(1).values.tolist()
    report = HorizonReport(layers, tokens, information, mean, peak, threshold, horizon_of(layers, mean, threshold))
    if plot is not None:
        report.plot = _plot_information(report, Path(plot), type(model).__name__)
    return report


def _plot_information(report: HorizonReport, path: Path, title: str) -> Path:
    # the style of vtprune.eval.collapse's entropy plot: one panel, the located layer as a dashed red line
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(report.layers, report.mean, marker="o", label="mean over tokens")
    axes.plot(report.layers, report.max, marker="^", linestyle=":", color="tab:gray", label="max over tokens")
    level = report.threshold * report.mean[0]
    axes.axhline(level, color="tab:orange", linewidth=1, label=f"{report.threshold:g} x layer {report.layers[0]}")
    if report.horizon_layer is not None:
        label = f"horizon: layer {report.horizon_layer}"
        axes.axvline(report.horizon_layer, color="tab:red", linestyle="--", label=label)
    if all(value > 0 and math.isfinite(value) for value in report.max):
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(f"decoder layer a visual token is dropped at ({len(report.tokens)} tokens measured)")
    axes.set_ylabel("KL(p_full || p_dropped) [nats]")
    axes.set_title(f"Visual-token information per layer - {title}", fontsize="medium")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
