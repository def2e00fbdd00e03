"""Information horizon — Wang, Wu, Ni, Yang, Liu, Yang, Wen, Tang, Liu, Zhou, He, "All You Need Are Random Visual
Tokens? Demystifying Token Pruning in VLLMs" (arXiv 2512.07580; v2 titled "When Token Pruning is Worse than Random:
Understanding Visual Token Information in VLLMs"). Code announced at https://github.com/YahongWang1/Information-Horizon;
as fetched for this implementation (commit d575a20, Dec 2025) it holds only a README saying "Code will be released
soon", so everything below follows the paper's abstract and our reading of it, and every number is ours or the
paper's headline.

The paper measures the *information* of a visual token at decoder layer l as the change of the model's output
probabilities when the token is removed at layer l, finds that it becomes uniform with depth and vanishes at an
intermediate layer (the *information horizon*; about layer 20 of LLaVA-1.5-7B's 32, deeper for OCR-like tasks and
for stronger models), and concludes that beyond it importance-based pruning is no better than random. Its recipe:
any training-free method early (DivPrune recommended) plus uniform random pruning in deep layers.

Two things here:

* :class:`InfoHorizon`, registered as ``"infohorizon"``: the recipe as a composition preset. Its stages are exactly
  those of ``vtprune.Compose(vtprune.DivPrune(), vtprune.Random(layer=L, seed=seed, positions="keep"))`` with
  per-part budgets ``(early_scale * keep, keep)``: DivPrune keeps ``early_scale`` times the final budget before the
  LLM, then a seeded uniform random subset of each image's survivors continues from decoder layer L.
* :func:`vtprune.eval.horizon.find_horizon`: leave-one-out information of visual tokens per decoder layer on one
  prompt, the horizon layer, and a plot (an analysis tool, beside ``vtprune.eval.collapse.find_collapse_layer``).

Choices that are ours (the paper's code is not out; its text gives no exact values we could check):

* ``layer``: 20 of 32 decoder layers (the abstract's "beyond the 20th"), scaled to the model's depth with
  ``ModelInfo.scale_layers``. The paper finds the horizon deeper for stronger models (Qwen2.5-VL); measure it with
  :func:`vtprune.eval.horizon.find_horizon` and pass ``layer=`` for such models.
* ``early_scale = 2``: DivPrune keeps twice the final budget and random pruning halves it at the horizon (the 50 %
  ratio of the paper's headline setting; how the paper splits its budget between the two stages is not stated).
  ``keep`` is the final budget, as for every other vtprune method; an explicit per-part ``keep=(early, final)``
  overrides ``early_scale``.
* Positions: DivPrune renumbers (it prunes before the LLM, as its authors do); the random stage keeps each kept
  token's original position, as FastV-style in-LLM slicing does (the spec's reading of the recipe).
* Random draws are seeded per image and stage exactly as ``vtprune.Random`` draws them (``seed=None``: torch's
  global generator), so a run is reproducible and a sample draws the same tokens alone or in a batch.
* :func:`vtprune.eval.horizon.find_horizon`'s information is ``KL(p_full || p_without_i)`` in nats between the
  next-token distributions at the prompt's last position (the paper says "change in the model output probabilities";
  which divergence it uses is unverified), the token's hidden state dropped from layer l on and every other token
  keeping its position; the horizon is the first measured layer whose mean information falls below ``threshold``
  (default 0.1) times the first measured layer's.

Families: every family (DivPrune is text- and tower-agnostic, random pruning needs no signal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vtprune.core.budget import Keep
from vtprune.core.compose import Compose, check_keeps
from vtprune.core.registry import (
    POSITION_CONVENTIONS,
    Method,
    ModelInfo,
    Stage,
    register_method,
)
from vtprune.methods.divprune import DivPrune
from vtprune.methods.random import Random

# the abstract's "beyond the 20th" layer of LLaVA-1.5-7B's 32
PAPER_LAYER, REFERENCE_DEPTH = 20, 32
# ours: DivPrune keeps twice the final budget, random pruning halves it at the horizon
EARLY_SCALE = 2.0


@register_method
@dataclass(init=False)
class InfoHorizon(Compose):
    """DivPrune before the LLM to ``early_scale`` x ``keep``, then seeded uniform random pruning to ``keep`` from
    decoder layer ``layer`` (default 20 of 32, scaled) on: the paper's DivPrune + random recipe."""

    name: ClassVar[str] = "infohorizon"
    summary: ClassVar[str] = "DivPrune before the LLM, then uniform random pruning beyond the information horizon"
    paper: ClassVar[str] = "Wang et al., arXiv 2512.07580 (YahongWang1/Information-Horizon)"

    # built from the options below (the random part's layer resolved for the model's depth by stages()), never
    # passed in; left out of comparisons and of to_dict, which the options define
    parts: tuple[Method, ...] = field(default=(), init=False, compare=False)
    # None: the depth-scaled default
    layer: int | None = None
    early_scale: float = EARLY_SCALE
    seed: int | None = 0

    def __init__(
        self,
        layer: int | None = None,
        early_scale: float = EARLY_SCALE,
        seed: int | None = 0,
        positions: str | None = None,
        keeps: Sequence[Keep] = (),
        **fields: Any,
    ) -> None:
        if fields:
            raise ValueError(
                f"{self.name}: unknown option(s) {', '.join(sorted(fields))}; allowed: layer, early_scale, seed, "
                "positions, keeps (to compose other parts use vtprune.Compose)"
            )
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"{self.name}: layer must be None (20 of 32 layers, scaled) or an int, got {layer!r}")
        if isinstance(early_scale, bool) or not isinstance(early_scale, (int, float)) or not early_scale >= 1:
            raise ValueError(
                f"{self.name}: early_scale must be a number >= 1 (DivPrune keeps early_scale x keep before the "
                f"LLM, random pruning then keeps keep), got {early_scale!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{self.name}: seed must be an int or None (torch's global generator), got {seed!r}")
        if positions is not None and positions not in POSITION_CONVENTIONS:
            raise ValueError(
                f"{self.name}: positions must be None (DivPrune renumbers, random keeps) or one of "
                f"{POSITION_CONVENTIONS}, got {positions!r}"
            )
        self.layer = layer
        self.early_scale = float(early_scale)
        self.seed = seed
        self.positions = positions
        self.keeps = check_keeps(self.name, tuple(keeps), 2) if keeps else ()
        self.parts = self.build_parts(PAPER_LAYER if layer is None else layer)

    @property
    def label(self) -> str:
        return self.name

    def build_parts(self, layer: int) -> tuple[Method, ...]:
        """The two methods this preset composes, random pruning at decoder layer ``layer``."""
        return (DivPrune(), Random(layer=layer, seed=self.seed, positions="keep"))

    def horizon_layer(self, model: ModelInfo) -> int:
        """The decoder layer random pruning starts at on ``model``: ``layer``, or 20 of 32 scaled to its depth."""
        if self.layer is not None:
            model.check_layer(self.name, "layer", self.layer)
            return self.layer
        return model.scale_layers((PAPER_LAYER,), REFERENCE_DEPTH, minimum=0)[0]

    def part_keeps(self, keep: Keep) -> tuple[Keep, ...]:
        # only the ratio of each part's budget to the final one matters to Compose.stages; the engine caps a
        # budget larger than an image at its token count
        return self.keeps or (keep * self.early_scale, keep)

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        # the random part's layer depends on the model's depth: resolve it before composing
        self.parts = self.build_parts(self.horizon_layer(model))
        return super().stages(model, keep)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "layer": self.layer,
            "early_scale": self.early_scale,
            "seed": self.seed,
            "positions": self.positions,
            "keeps": list(self.keeps),
        }
