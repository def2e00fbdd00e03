"""ATP-LLaVA — Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (CVPR 2025,
arXiv 2412.00447; project page yxxxb.github.io/ATP-LLaVA-page). There is NO official code; where the paper is silent
we follow an unofficial reimplementation (Sneha421/AI6103-ATP-LLaVA, unverified, marked "unofficial") or choose
ourselves (marked "ours").

An ATP module sits before decoder layers 4, 14 and 24 of 32 (unofficial; scaled to other depths: 1, 4, 6 on the
8-layer embedded LLaVA), each with its own parameters (paper). It scores the current visual tokens of each image with
the attention of the layer before it (paper), recomputed by the engine from that layer's queries and keys:

* self-modality score ``S_self``: the head-averaged attention each visual token receives from the image's visual
  tokens (paper; mean over heads and visual queries: unofficial; only the image's own tokens as queries: ours);
* cross-modality score ``S_cross``: the head-averaged attention it receives from the instruction tokens (the text
  after the last visual token), averaged over them (paper / unofficial);
* each score is normalised within the image so its mean over the image's current tokens is 1 and its log is taken
  (ours: scale-free across token counts); ``S_red = (log S_self + log S_cross) / 2`` (unofficial averages the raw
  scores; the mean of logs is ours);
* spatial score ``S_sp``: ``1 - R_s * lambda = 0.25`` on a uniform lattice of ``R_s = 1/4`` of the patch grid
  (stride 2; unofficial: R_s = 0.25, lambda = 3), 0 elsewhere; our lattice takes cell centres
  (:func:`vtprune.methods.uniform.lattice`).

Two instance-specific thresholds come from a small network (paper: learnable, instance-specific; unofficial:
``sigmoid(Linear(D->1)(Linear(2->D)([mean S_self, mean S_cross])))``). Ours: its input is per-image statistics of the
normalised log scores (std and max of each) and the target ratio ``r`` (``r`` and ``log r``), through
``Linear(6->D)``, GELU, ``Linear(D->2)``: ``theta_r`` on the log-score scale (no sigmoid) and
``theta_s = sigmoid(.)``. A token stays when ``S_red > theta_r`` or ``S_sp > theta_s`` (unofficial's hard rule; it
is Spatial Augmented Pruning: the lattice joins when ``theta_s < 0.25``). Dropped tokens leave the sequence; kept
ones keep their positions (paper). Each image keeps at least one token (ours: its highest ``S_red``).

``keep`` is the target ratio ``r`` (``keep / n`` for a count, the fraction itself otherwise) of the *layer-averaged*
visual tokens the budget loss was trained for (ours), so the counts are instance-wise and only match ``keep`` on
average; ``r >= 1`` keeps every token (ours: keep extreme = dense). The thresholds were trained with the LLM frozen
(ours; the paper's Tab. 3 freezes it too) by ``python -m vtprune.train.atp``; see that module for the loss. Weights:
``weights=None`` loads the ones shipped for the embedded LLaVA; another model needs its own
(``checked_weights`` refuses a model of another family, width or depth when the method is wrapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import Method, ModelInfo, Stage, register_method
from vtprune.core.signals import query_slots
from vtprune.core.weights import ModuleCache, checked_weights, weights_path
from vtprune.embedded import trained_dir
from vtprune.methods.uniform import evenly_spaced, lattice

AUTHORS_LAYERS, REFERENCE_DEPTH = (4, 14, 24), 32  # unofficial code's module layers of LLaVA-1.5-7B
SPATIAL_RATIO, SPATIAL_LAMBDA = 0.25, 3.0  # unofficial: R_s and lambda_sample
SPATIAL_SCORE = 1.0 - SPATIAL_RATIO * SPATIAL_LAMBDA  # a lattice token's spatial score (0.25)
TEMPERATURE = 10.0  # soft masks' sharpness at the start of training (unofficial T = 10; annealed, see the trainer)
FEATURES = 6  # threshold network input: std / max of both log scores, r, log r
WIDTH = 32  # threshold network hidden width (ours)
LOG_FLOOR = 1e-4  # normalised scores are clamped here before the log (a token nobody attends to)


class ThresholdNet(nn.Module):
    """One ATP module's threshold network: image statistics and target ratio -> (theta_r, theta_s)."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, width), nn.GELU(), nn.Linear(width, 2))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(features)
        return out[..., 0], torch.sigmoid(out[..., 1])


class ATPModules(nn.Module):
    """The threshold networks of every stage (own parameters per stage, as in the paper)."""

    def __init__(self, stages: int, width: int = WIDTH) -> None:
        super().__init__()
        self.stages = nn.ModuleList(ThresholdNet(width) for _ in range(stages))


def build_modules(meta: dict[str, Any]) -> ATPModules:
    """The modules a weights file's metadata describes."""
    return ATPModules(len(meta["layers"]), int(meta["width"]))


def normalised_log(scores: Tensor, weight: Tensor) -> Tensor:
    """``log(scores / mean)`` with the mean over the image's current tokens (``weight``: 1 current, 0 gone; soft
    while training), along the last dimension."""
    mean = (scores * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.log((scores / mean.clamp_min(1e-12)).clamp_min(LOG_FLOOR))


def image_features(log_self: Tensor, log_cross: Tensor, weight: Tensor, ratio: Tensor) -> Tensor:
    """Threshold network input per image ``[..., 6]``: weighted std and max (over tokens with weight > 0.5) of
    both normalised log scores, ``r`` and ``log r``."""
    total = weight.sum(-1).clamp_min(1e-6)
    present = weight > 0.5
    stats = []
    for values in (log_self, log_cross):
        mean = (values * weight).sum(-1) / total
        std = (((values - mean[..., None]) ** 2 * weight).sum(-1) / total + 1e-8).sqrt()  # finite gradient at 0
        top = torch.where(present, values, torch.full_like(values, -math.inf)).amax(-1)
        top = torch.where(present.any(-1), top, values.amax(-1))
        stats += [std, top]
    return torch.stack([*stats, ratio, ratio.log()], dim=-1)


def redundancy(log_self: Tensor, log_cross: Tensor) -> Tensor:
    return (log_self + log_cross) / 2


def hard_keep(s_red: Tensor, on_lattice: Tensor, theta_r: Tensor, theta_s: Tensor) -> Tensor:
    """Inference rule: ``S_red > theta_r`` or ``S_sp > theta_s``; at least one token (the highest ``S_red``)."""
    spatial = torch.where(on_lattice, SPATIAL_SCORE, 0.0)
    keep = (s_red > theta_r[..., None]) | (spatial > theta_s[..., None])
    if keep.shape[-1] and not bool(keep.any()):
        keep[s_red.argmax()] = True
    return keep


def soft_keep(
    s_red: Tensor, on_lattice: Tensor, theta_r: Tensor, theta_s: Tensor, temperature: float = TEMPERATURE
) -> Tensor:
    """Training mask: ``max(sigmoid((S_red - theta_r) T), sigmoid((S_sp - theta_s) T))`` (unofficial), the spatial
    term on lattice tokens only (ours: off the lattice ``S_sp = 0 < theta_s``, so the hard rule never keeps them)."""
    redundant = torch.sigmoid((s_red - theta_r[..., None]) * temperature)
    spatial = torch.sigmoid((SPATIAL_SCORE - theta_s[..., None]) * temperature) * on_lattice.to(s_red.dtype)
    return torch.maximum(redundant, spatial)


def lattice_tokens(item: VisualItem, device: torch.device | None = None) -> Tensor:
    """Whether each of the item's tokens (original numbering) lies on the spatial lattice, ``[num_tokens]``."""
    marked = torch.zeros(item.num_tokens, dtype=torch.bool, device=device)
    if item.grids:
        for grid in item.grids:
            count = max(1, math.ceil(grid.height * grid.width * SPATIAL_RATIO))
            marked[grid.token_indices(device)[lattice(grid.height, grid.width, count).to(device)]] = True
    else:  # no known grid: evenly spaced in sequence order
        count = max(1, math.ceil(item.num_tokens * SPATIAL_RATIO))
        marked[evenly_spaced(item.num_tokens, count).to(device)] = True
    return marked


def target_ratio(keep: Keep, item: VisualItem) -> float:
    """``r``: a count's share of the item's tokens, or the fraction itself."""
    if isinstance(keep, float):
        return keep
    return keep / max(item.num_tokens, 1)


class _AllTokens:
    """Budget rule of a dynamic stage: every token is selectable; it remembers the wrap's ``keep`` for ``select``."""

    def __init__(self, keep: Keep) -> None:
        self.keep = keep

    def __call__(self, keep: Keep, item: VisualItem) -> int:
        return item.num_tokens


def visual_rows(layout: Layout) -> tuple[Tensor, Tensor]:
    """Slots of every sample's visual tokens, ``[B, R]``, and which are real."""
    chosen = layout.valid & layout.visual
    counts = chosen.sum(1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.arange(width, device=order.device)[None] < counts[:, None]


_MODULES = ModuleCache()


@register_method
@dataclass
class ATPLLaVA(Method):
    """Learned instance-wise thresholds on self/cross attention plus a spatial lattice, before layers 4/14/24 of 32."""

    name = "atp"
    summary = "learned per-image thresholds on self/cross-modal attention + spatial lattice (trained; 4/14/24 of 32)"
    paper = "Ye et al., CVPR 2025 (arXiv 2412.00447; no official code)"
    trained = True

    weights: str | None = None
    positions: str = "keep"

    def _path(self) -> Path:
        return weights_path(self.name, self.weights, trained_dir(self.name))

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        path, meta = checked_weights(self.name, self.weights, trained_dir(self.name), model)
        layers = model.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
        if list(meta.get("layers", layers)) != layers:
            raise ValueError(f"{self.name}: the weights at {path} are for modules at layers {meta['layers']}, "
                             f"this model's are {layers}")  # fmt: skip
        for layer in layers:
            model.softmax_source(self.name, layer, "attention scores the tokens")
        rule = _AllTokens(keep)
        return [
            Stage(layer=layer, attention_from=layer - 1, query="instruction", dynamic=True, budget_rule=rule)
            for layer in layers
        ]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        keep = ctx.stage.budget_rule.keep if isinstance(ctx.stage.budget_rule, _AllTokens) else 1.0
        if all(target_ratio(keep, view.item) >= 1 for view in ctx.items):  # keep extreme = dense
            return [view.selectable.nonzero().squeeze(1) for view in ctx.items]
        path = self._path()
        device = ctx.layout.valid.device
        modules = _MODULES.get(path, build_modules, device, torch.float32)
        layers = ctx.model.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
        net = modules.stages[layers.index(ctx.stage.layer)]
        rows_v, real_v = visual_rows(ctx.layout)
        attention_v = ctx.attention_rows(rows_v, real_v)  # [B, R, L]
        rows_t, real_t = query_slots(ctx.layout, "instruction")
        attention_t = ctx.attention_rows(rows_t, real_t)
        selections = []
        for view in ctx.items:
            b = view.sample
            if target_ratio(keep, view.item) >= 1:
                selections.append(view.selectable.nonzero().squeeze(1))
                continue
            own = real_v[b] & torch.isin(rows_v[b], view.slots)
            s_self = attention_v[b][own][:, view.slots].mean(0) if bool(own.any()) else None
            text = real_t[b]
            s_cross = attention_t[b][text][:, view.slots].mean(0) if bool(text.any()) else None
            s_self = s_self if s_self is not None else torch.ones(view.num_tokens, device=device)
            s_cross = s_cross if s_cross is not None else s_self
            selections.append(self._select_item(net, view, s_self, s_cross, keep))
        return selections

    @staticmethod
    def _select_item(net: ThresholdNet, view: ItemView, s_self: Tensor, s_cross: Tensor, keep: Keep) -> Tensor:
        device = s_self.device
        members = view.selectable.nonzero().squeeze(1)
        if members.numel() == 0:
            return members
        weight = torch.ones(members.numel(), device=device)
        log_self = normalised_log(s_self[members].float(), weight)
        log_cross = normalised_log(s_cross[members].float(), weight)
        ratio = torch.tensor(target_ratio(keep, view.item), device=device, dtype=torch.float32)
        with torch.no_grad():
            theta_r, theta_s = net(image_features(log_self, log_cross, weight, ratio))
        on_lattice = lattice_tokens(view.item, device)[view.tokens[members]]
        return members[hard_keep(redundancy(log_self, log_cross), on_lattice, theta_r, theta_s)]


__all__ = ["ATPLLaVA", "ATPModules", "ThresholdNet", "build_modules", "hard_keep", "lattice_tokens", "soft_keep"]
