"""DyVTE — Sun et al., "Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the
Empirical Findings" (arXiv 2411.19628), https://github.com/DoubtedSteam/DyVTE.

A trained method: after each decoder layer a small hyper-network (one per layer) reads the text tokens' state and
decides whether the visual tokens have done their job; at the first layer whose gate says "exit", every visual token
of the sample leaves the sequence (and the later layers' KV cache). As the authors' code
(``llava/model/language_model/modeling_llama.py``, ``Router``):

* Gate of layer k: ``Linear(2H -> width, no bias) -> GELU -> Linear(width -> 2, no bias)`` on the concatenation of
  the mean of the text tokens after the image (up to, not including, the last prompt token) and the last prompt
  token's state, both as layer k outputs them (before the final norm). Logit 1 means "exit". Only the gates train;
  the model stays frozen.
* Labels (:mod:`vtprune.train.dyvte`): a sample may exit after layer k when, with its visual tokens gone from layer
  k + 1 on, the prediction matches the full model's (> 0.99 of the answer tokens) and the answer loss grows by less
  than 3 % (``loss_exit < 1.03 loss_full``; we add 0.05 nats of slack, see the trainer); 2-class cross-entropy.
* Inference: exit after the first layer whose exit probability exceeds ``threshold`` (the code's ``logit[1] >
  logit[0]``: 0.5). Kept tokens and the text keep their positions (the code slices positions without renumbering).

Ours, and why:

* Per-sample exits in a batch (the authors' code runs batch size 1): the engine drops each sample's visual tokens at
  its own layer and re-pads the batch to the longest remaining sample, so FLOPs fall per sample at once
  (``ForwardRecord.exit_layers()``, ``vtprune.eval.flops.sample_llm_flops``), while a batch's wall time falls by
  what its longest sample drops; we do not regroup samples by exit layer.
* Gate width 128 for the embedded model's width 192 (the authors' 2048 for 5120, rounded up); the exit after the
  last layer is never considered (nothing is left to save), the exit after layer 0 is, as in the code.
* Labels on every layer for each training sample (the code draws one layer per batch): at this scale all eight
  forwards are cheap. Answers are one word here, so the label reads the answer word's prediction and loss.
* ``keep``: the paper has no budget. Here it caps the layer-averaged visual tokens: an image whose gate has not
  fired by decoder layer ``E = floor(L * b / n)`` (``b`` its budget of ``n`` tokens, at least layer 1) exits there, so
  a sweep can set DyVTE beside budgeted methods; ``keep=1.0`` (every token) lets the gates alone decide. The average
  cannot fall below ``n / L`` (an exit after layer 0), so smaller budgets exit at layer 1 and keep that.
* ``layer``: every sample exits at that decoder layer's input, no gate read: the paper's static visual-token exit
  baseline (and how training builds its labels).
* Structural tokens (LLaVA-NeXT's row newlines) never leave: the engine keeps them for every method.

Families: all with full-attention layers after the exit (the gates read hidden states only); the shipped gates are
trained on the embedded LLaVA (``python -m vtprune.train.dyvte``), other models need their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.core.budget import Keep, tokens_to_keep
from vtprune.core.context import PruneContext
from vtprune.core.layout import VisualItem
from vtprune.core.registry import Method, ModelInfo, Stage, register_method
from vtprune.core.weights import ModuleCache, checked_weights, weights_path
from vtprune.embedded import trained_dir


class ExitGates(nn.Module):
    """One gate per decoder layer k (the exit after layer k), as the authors' ``Router``."""

    def __init__(self, hidden_size: int, num_gates: int, width: int = 128) -> None:
        super().__init__()
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_size, width, bias=False), nn.GELU(), nn.Linear(width, 2, bias=False))
            for _ in range(num_gates)
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ExitGates:
        return cls(meta["hidden_size"], meta["num_layers"] - 1, meta["width"])

    def forward(self, layer: int, features: Tensor) -> Tensor:
        """Exit logits ``[B, 2]`` after decoder layer ``layer`` from :func:`exit_features` ``[B, 2H]``."""
        return self.gates[layer](features)


def exit_features(hidden: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
    """The gates' input per sample, ``[B, 2H]``: the mean state of the text after the sample's last visual token (up
    to, not including, its last real token) and the last real token's state. ``valid`` / ``visual`` ``[B, L]`` mark
    real and visual slots (left or right padding)."""
    slots = torch.arange(hidden.shape[1], device=hidden.device).expand_as(valid)
    last = torch.where(valid, slots, -1).max(1).values
    last_visual = torch.where(visual, slots, -1).max(1).values
    text = valid & (slots > last_visual[:, None]) & (slots < last[:, None])
    weights = text.to(hidden.dtype)
    mean = (weights[..., None] * hidden).sum(1) / weights.sum(1).clamp(min=1)[:, None]
    return torch.cat([mean, hidden[torch.arange(hidden.shape[0], device=hidden.device), last]], dim=-1)


def cap_layer(keep: Keep, item: VisualItem, num_layers: int) -> int:
    """The decoder layer at whose input an item exits at the latest under ``keep`` (``num_layers``: never)."""
    total = item.num_selectable
    budget = tokens_to_keep(keep, total)
    if budget >= total:
        return num_layers
    return max(1, math.floor(num_layers * budget / total))


@register_method
@dataclass
class DyVTE(Method):
    """Every visual token of a sample leaves after the first decoder layer whose trained gate says so."""

    name = "dyvte"
    summary = "trained gates on the text tokens' state: all visual tokens exit after the first layer that fires"
    paper = "Sun et al., arXiv 2411.19628 (DoubtedSteam/DyVTE)"
    trained: ClassVar[bool] = True

    threshold: float = 0.5
    weights: str | None = None
    layer: int | None = None
    positions: str = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{self.name}: threshold (the exit probability to exceed) must lie in [0, 1], "
                             f"got {self.threshold}")  # fmt: skip
        self._gate_cache = ModuleCache()

    def _path(self) -> Path:
        return weights_path(self.name, self.weights, trained_dir(self.name))

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layers = model.num_layers
        if self.layer is not None:
            model.check_layer(self.name, "layer", self.layer, minimum=1)
            return [Stage(layer=self.layer, dynamic=True, budget_rule=lambda keep, item: 0)]
        checked_weights(self.name, self.weights, trained_dir(self.name), model)

        def rule(layer: int):  # the item's tokens before its cap layer, none from it on
            return lambda keep, item: item.num_selectable if layer < cap_layer(keep, item, layers) else 0

        return [Stage(layer=layer, dynamic=True, budget_rule=rule(layer)) for layer in range(1, layers)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        layout, hidden = ctx.layout, ctx.hidden_states
        if self.layer is not None:  # the static exit: every sample leaves here
            exits = torch.ones(layout.batch_size, dtype=torch.bool, device=hidden.device)
        elif self.threshold < 1.0 and bool(layout.visual.any()):
            gates = self._gate_cache.get(self._path(), ExitGates.from_meta, hidden.device, hidden.dtype)
            # the gate of layer k reads what layer k outputs: the input of this stage's layer k + 1
            logits = gates(ctx.stage.layer - 1, exit_features(hidden, layout.valid, layout.visual))
            exits = logits.float().softmax(-1)[:, 1] > self.threshold
        else:  # never fires, or no visual token left to leave
            exits = torch.zeros(layout.batch_size, dtype=torch.bool, device=hidden.device)
        selections = []
        for view in ctx.items:
            leave = view.budget == 0 or bool(exits[view.sample])
            everything = view.selectable.nonzero().squeeze(1)
            selections.append(everything[:0] if leave else everything[: view.budget])
        return selections
