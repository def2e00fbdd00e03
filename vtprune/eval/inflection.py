"""AdaptInfer's offline analysis (Zhang et al., arXiv 2508.06084; the authors' ``prepocess.py`` in
weiczh02/AdaptInfer-base): where the text-weighted text->vision attention of a model shifts across decoder layers,
the "inflection" layers :class:`vtprune.methods.adaptinfer.AdaptInfer` prunes at. The method's module holds the
scoring rule (:func:`~vtprune.methods.adaptinfer.text_prior`,
:func:`~vtprune.methods.adaptinfer.weighted_vision_scores`); this tool runs a whole model, so it lives beside :mod:`vtprune.eval.collapse` (methods do not run models).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vtprune.api import adapter_for
from vtprune.eval.collapse import capture_decoder_qk
from vtprune.methods.adaptinfer import weighted_vision_scores


@dataclass
class InflectionReport:
    """Per decoder layer (NaN where not measured: layers without softmax attention; the shift of the first one):
    ``change_points`` how many of the tracked (sample, visual token) curves change regime after this layer (the
    authors' histogram); ``shift`` the Jensen-Shannon divergence (nats) between this layer's and the previous measured
    layer's weighted vision-score distributions (mean over samples with images); ``vision_share`` the mean share of the
    instruction rows' attention (over heads) that lands on visual tokens; ``inflection_layers`` the chosen layers,
    ascending (pass them as ``AdaptInfer(layers=...)``); ``scores`` each layer's weighted scores ``[B, L]``."""

    change_points: list[int]
    shift: list[float]
    vision_share: list[float]
    inflection_layers: list[int]
    plot: Path | None = None
    scores: list[Tensor] = field(default_factory=list, repr=False)


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last dim (0 <= JS <= ln 2)."""
    mixture = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30) / mixture.clamp_min(1e-30)).log(), 0.0).sum(-1)

    return (kl(p) + kl(q)) / 2


def first_change_point(curves: Tensor, min_size: int = 2) -> Tensor:
    """Per curve ``[n, L]``, the split ``k`` (segments ``[0, k)`` and ``[k, L)``, each at least ``min_size`` long)
    minimising the two segments' summed squared deviations from their means: ruptures' ``Binseg(model="l2")`` with one
    breakpoint, which the authors' ``prepocess.py`` runs. Returns ``k - 1``, the last index before the change."""
    length = curves.shape[-1]
    if length < 2 * min_size:
        raise ValueError(f"a change point needs curves of at least {2 * min_size} layers, got {length}")
    x = curves.double()
    zero = torch.zeros_like(x[:, :1])
    total, squares = torch.cat([zero, x.cumsum(-1)], -1), torch.cat([zero, (x * x).cumsum(-1)], -1)
    splits = torch.arange(min_size, length - min_size + 1, device=curves.device)

    def sse(start: Tensor | int, end: Tensor | int) -> Tensor:
        start_index = torch.as_tensor(start, device=curves.device).expand_as(splits)
        end_index = torch.as_tensor(end, device=curves.device).expand_as(splits)
        count = (end_index - start_index).to(x.dtype)
        sums = total[:, end_index] - total[:, start_index]
        return squares[:, end_index] - squares[:, start_index] - sums * sums / count

    cost = sse(0, splits) + sse(splits, length)  # [n, splits]
    # ruptures keeps the largest gain and, among equal gains, the later split
    best = cost.shape[-1] - 1 - cost.flip(-1).argmin(-1)
    return splits[best] - 1


def pick_inflections(counts: list[int], count: int) -> list[int]:
    """The ``count`` layers with the most change points (at least one; earlier layers first among equals),
    ascending."""
    ranked = sorted((i for i, n in enumerate(counts) if n > 0), key=lambda i: (-counts[i], i))
    return sorted(ranked[:count])


@torch.no_grad()
def find_inflection_layers(
    model: nn.Module, inputs: dict, plot: str | Path | None = None, count: int = 3, top_tokens: float = 0.1
) -> InflectionReport:
    """Locate the layers where the text-guided attention on the visual tokens changes regime (the paper's offline
    "inflection locations"), following the authors' ``prepocess.py``.

    Runs ``model`` once on ``inputs`` (a batch with at least one image and text after it, e.g. from its processor)
    and, for every softmax-attention decoder layer, recomputes the instruction rows from its queries and keys and
    scores the visual tokens as :class:`AdaptInfer` does. Per sample, the ``top_tokens`` share of its visual tokens
    with the largest score summed over layers (the authors: 58 of 576) are tracked; each one's cumulative score over
    the layers gets one change point (least-squares split, as ruptures' ``Binseg(model="l2")``), and the histogram of
    those layers over tokens and samples gives the ``count`` inflection layers (the most frequent ones). The report
    also holds the Jensen-Shannon shift between consecutive layers' score distributions and the vision share. A PNG of
    the histogram and the shift is written to ``plot`` if given.

    Ours: each layer's scores are normalised over the sample's visual tokens before the curves are summed (the authors
    dump raw text->vision attention, whose weighting their script does not show), so that every layer counts alike.
    """

    # imported here: vtprune.api imports the method registry, which imports this module
    from vtprune.core.attention import attention_rows, gather_rows
    from vtprune.core.compat import SOFTMAX_ATTENTION

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"find_inflection_layers: count must be an int >= 1, got {count!r}")
    if not 0 < top_tokens <= 1:
        raise ValueError(f"find_inflection_layers: top_tokens must be a share in (0, 1], got {top_tokens!r}")
    adapter = adapter_for(model)
    layers = adapter.decoder_layers
    measured = [i for i, layer_type in enumerate(adapter.layer_types()) if layer_type in SOFTMAX_ATTENTION]
    if len(measured) < 4:
        raise ValueError(
            f"find_inflection_layers needs at least 4 softmax-attention decoder layers, this model has {len(measured)}"
        )

    ids = inputs.get("input_ids")
    visual = torch.zeros(ids.shape if ids is not None else inputs["inputs_embeds"].shape[:2], dtype=torch.bool)
    for mask in adapter.input_placeholders(inputs).values():
        visual = visual.to(mask.device) | mask
    if not visual.any():
        raise ValueError("find_inflection_layers needs inputs with at least one image")
    valid = inputs.get("attention_mask")
    valid = torch.ones_like(visual) if valid is None else valid.bool()
    slots = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
    last_visual = torch.where(visual, slots, -1).max(1).values
    text = valid & (slots > last_visual[:, None]) & (last_visual[:, None] >= 0)
    counts = text.sum(1)
    imaged = (visual.any(1) & (counts > 0)).nonzero().squeeze(1).tolist()
    if not imaged:
        raise ValueError("find_inflection_layers needs text after the image (the instruction rates the image)")
    rows = torch.argsort((~text).to(torch.int8), dim=1, stable=True)[:, : max(int(counts.max()), 1)]
    real = torch.arange(rows.shape[1], device=rows.device)[None] < counts[:, None]
    blocks = adapter.bidirectional_blocks(inputs, visual)

    captured = capture_decoder_qk(model, adapter, inputs, keys=True)
    share, shift = [math.nan] * len(layers), [math.nan] * len(layers)
    scores: list[Tensor] = [torch.empty(0)] * len(layers)
    distributions: dict[int, list[Tensor]] = {}
    for index in measured:
        parts = adapter.decoder_parts(index)
        q, k, rotary = captured[index]["q"], captured[index]["k"], captured[index]["rotary"]
        rotary = tuple(table.expand(q.shape[0], *table.shape[1:]) for table in rotary)  # [1, L, r] without position_ids
        probs = attention_rows(
            parts.attention, gather_rows(q, rows), k, rotary, rows, valid, parts.gated_query,
            parts.interleaved_rotary, blocks,
        ) * real[:, None, :, None]  # fmt: skip
        score = weighted_vision_scores(probs, rows, real)
        scores[index] = score.cpu()
        on_visual = (probs * visual[:, None, None, :]).sum(-1)  # [B, heads, R]
        share[index] = float(torch.stack([on_visual[b, :, real[b]].mean() for b in imaged]).mean())
        distributions[index] = [_normalised(score[b][visual[b]]) for b in imaged]
    for previous, index in itertools.pairwise(measured):
        pairs = zip(distributions[previous], distributions[index])
        shift[index] = float(torch.stack([jensen_shannon(p, q) for p, q in pairs]).mean())

    histogram = [0] * len(layers)
    for position in range(len(imaged)):
        curves = torch.stack([distributions[index][position] for index in measured], dim=1)  # [V, measured layers]
        tracked = curves.sum(1).topk(max(1, math.ceil(top_tokens * curves.shape[0]))).indices
        for split in first_change_point(curves[tracked].cumsum(1)).tolist():
            histogram[measured[split]] += 1
    report = InflectionReport(histogram, shift, share, pick_inflections(histogram, count), scores=scores)
    if plot is not None:
        report.plot = _plot_inflections(report, Path(plot), type(model).__name__)
    return report


def _normalised(values: Tensor) -> Tensor:
    values = values.float().clamp_min(0)
    total = values.sum()
    return values / total if total > 0 else torch.full_like(values, 1 / max(values.numel(), 1))


def _plot_inflections(report: InflectionReport, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    layers = range(len(report.change_points))
    axes.bar(layers, report.change_points, color="tab:blue", alpha=0.6, label="change points (tracked tokens)")
    for n, layer in enumerate(report.inflection_layers):
        axes.axvline(layer, color="tab:red", linestyle="--", label="inflection layers" if n == 0 else None)
    axes.set_xlabel("decoder layer (regime changes after it)")
    axes.set_ylabel("tokens whose curve changes here")
    shift_axes = axes.twinx()
    shifted = [i for i, value in enumerate(report.shift) if not math.isnan(value)]
    shift_axes.plot(
        shifted, [report.shift[i] for i in shifted], marker="o", color="tab:green", label="shift (JS divergence)"
    )
    shift_axes.set_ylabel("JS divergence from previous layer")
    handles, labels = axes.get_legend_handles_labels()
    extra_handles, extra_labels = shift_axes.get_legend_handles_labels()
    # below the axes, so it never hides a bar or the curve
    axes.legend(
        handles + extra_handles, labels + extra_labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
        fontsize="small", frameon=False,
    )  # fmt: skip
    axes.set_title(f"AdaptInfer inflection layers - {title}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
