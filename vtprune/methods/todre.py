"""ToDRE — Li, Yang, [Zhang, Shao,] Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient
Large Vision-Language Models" (arXiv 2505.18757 v1, May 2025) / "ToDRE: Effective Visual Token Pruning via Token
Diversity and Task Relevance" (v2, Nov 2025).

Authors' code: none published that we could find (searched GitHub code, issues and web pages for "ToDRE" /
2505.18757 on 2026-11-30: only the paper, its abstract pages and paper lists). This implementation follows the
paper's abstract (both versions) and marks everything the abstract leaves open as ours.

Two stages, training-free:

1. Token diversity, before the LLM: per image, a greedy diversity selection on cosine distance
   ``d(i, j) = 1 - cos(x_i, x_j)`` keeps ``stage1_scale`` times the wrap's budget.
   ``variant="maxsum"`` (v2, "greedy max-sum diversification"): start from the token with the largest summed
   distance to all tokens, then repeatedly add the token whose summed distance to the chosen ones is largest.
   ``variant="kcenter"`` (v1, "greedy k-center"): farthest-point selection, each step adding the token whose
   distance to its nearest chosen token is largest (DivPrune's greedy max-min, reused:
   :func:`vtprune.methods.divprune.max_min_diverse`).
2. Task relevance, inside the LLM ("information migration": past some depth the visual information has moved into
   the text tokens): at the input of decoder layer ``layer`` the remaining image tokens are ranked by the attention
   the last prompt token (``query="last"``) or the instruction tokens (``query="instruction"``) pay them, averaged
   over heads, recomputed from that layer's own queries and keys (so the model keeps SDPA / FlashAttention; the
   abstract stresses compatibility with efficient attention operators); the top ``keep`` continue.

Choices that are ours (the abstract leaves them open or we deviate; each also marked below):

* Default variant ``"maxsum"``: the latest paper version (v2) replaced v1's k-center by max-sum diversification.
* Feature space: the projected features (the LLM's input embeddings), as DivPrune uses, not the vision encoder's
  output the abstract names. They exist on every family with one row per LLM token (Qwen's 2 x 2 merges, InternVL /
  SmolVLM's pixel shuffle and Gemma 3's pooling make encoder rows and LLM tokens differ), and on LLaVA the
  projector is a token-wise MLP applied to exactly those encoder rows.
* Seeds (no text signal and no [CLS] on most families, so both are feature-only and deterministic): max-sum starts
  from the token with the largest summed distance to all tokens (the max-sum objective with every token as the
  reference set; under cosine distance, the token least aligned with the image's mean direction); k-center starts
  from the token whose nearest neighbour is farthest (DivPrune's seed, which comes with the reused selector).
  Ties go to the lowest index.
* Budgets: ``keep`` is the final budget (after stage 2); stage 1 keeps ``stage1_scale`` times it (default 2: the
  late stage keeps the more relevant half). The paper keeps 10 % after the encoder (``keep=0.05`` with the default
  scale gives that on stage 1) and then drops *all* visual tokens at the late layer (v1: "adaptively prunes all
  visual tokens within certain LLM decoder layers"; v2: "as well as all visual tokens in certain LLM decoder
  layers"): ``drop_all=True`` does that (``keep`` then counts the tokens the LLM receives, stage 1's, and the late
  layer keeps none; no attention is read). The default prunes by relevance instead, as the v2 summary describes
  ("prunes remaining tokens at a late decoder layer guided by cross-modal attention"), so that ``keep`` is what
  stays, like every other method's budget; the "adaptively" of v1 (which layer, which inputs) is not specified.
* Late layer: 16 of 32 (0-based input index, i.e. after 16 of LLaVA-1.5-7B's 32 layers), scaled to other depths
  with :meth:`ModelInfo.scale_layers`. The abstract gives no index; 16 is where visual-token withdrawal (VTW, Lin et
  al., AAAI 2025) drops all visual tokens of LLaVA-1.5-7B after finding the attention to them vanishes, and where
  PyramidDrop's second stage sits.
* Relevance query: the last prompt token by default (text->vision attention of the last token, averaged over heads,
  the standard choice of FastV / PyramidDrop); ``"instruction"`` averages over the instruction tokens.
* Models whose stage layer has no softmax attention (Qwen3.5's linear-attention layers): the relevance is read
  from the last softmax-attention layer before it (as DART reads its keys); a clear error when there is none.
* Positions renumbered contiguously after each stage (``positions="renumber"``): the pre-LLM stage, where most tokens
  go, inserts only the kept tokens as LLaVA-style implementations do; ``"keep"`` keeps the original positions.
* Selection is per image (per frame for videos), over all its views on LLaVA-NeXT; structural tokens (newlines)
  always stay.

Families: all of them (the signals are the projected features and the LLM's own attention).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method, top_budget
from vtprune.methods.divprune import max_min_diverse

VARIANTS = ("maxsum", "kcenter")
QUERIES = ("last", "instruction")
# ours: the late layer (0-based input) on LLaVA-1.5-7B's 32 layers, scaled to other depths (see the docstring)
REFERENCE_LAYER, REFERENCE_DEPTH = 16, 32


def max_sum_diverse(features: Tensor, count: int) -> Tensor:
    """Greedy max-sum diversification of ``count`` rows by cosine distance, in pick order: the first pick has the
    largest summed distance to every row, each next pick the largest summed distance to the rows already picked."""
    x = F.normalize(features.float(), dim=-1)
    distance = 1 - x @ x.T
    n = distance.shape[0]
    count = min(count, n)
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    choice = distance.sum(0).argmax().reshape(1)  # ours: the seed (see the module docstring)
    picked = torch.empty(count, dtype=torch.long, device=features.device)
    total = torch.zeros(n, dtype=distance.dtype, device=distance.device)  # each row's summed distance to the picks
    # indices stay on the device, as in vtprune.core.greedy (an int() per pick waits for a GPU)
    for step in range(count):
        picked[step] = choice[0]
        total += distance.index_select(0, choice)[0]  # rows already picked stay at -inf
        total.index_fill_(0, choice, float("-inf"))
        if step + 1 < count:
            choice = total.argmax().reshape(1)
    return picked


def diverse_subset(features: Tensor, count: int, variant: str) -> Tensor:
    """The ``count`` rows ToDRE's stage 1 keeps, in pick order: max-sum (v2) or k-center (v1)."""
    if variant == "maxsum":
        return max_sum_diverse(features, count)
    if variant == "kcenter":
        return max_min_diverse(features, count)  # greedy k-center = farthest-point = max-min (DivPrune's)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def relevance_layer(model: ModelInfo, layer: int) -> int | None:
    """The decoder layer whose attention ranks the tokens at ``layer``: ``layer`` itself, or the last softmax-attention
    layer before it where ``layer`` has none (linear attention); None when there is none."""
    return model.last_softmax_layer(layer + 1)


@register_method
@dataclass
class ToDRE(Method):
    """Greedy diversity selection before the LLM, then cross-modal relevance drops at a late decoder layer."""

    name = "todre"
    summary = "greedy max-sum (or k-center) diversity before the LLM, then last-token attention at layer 16 of 32"
    paper = "Li et al., arXiv 2505.18757 (no public code)"

    variant: str = "maxsum"
    stage1_scale: float = 2.0
    layer: int | None = None
    query: str = "last"
    drop_all: bool = False
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(
                f"{self.name}: variant must be 'maxsum' (v2, max-sum diversification) or 'kcenter' (v1, greedy "
                f"k-center), got {self.variant!r}"
            )
        if not isinstance(self.drop_all, bool):
            raise ValueError(f"{self.name}: drop_all must be True or False, got {self.drop_all!r}")
        if self.query not in QUERIES:
            raise ValueError(f"{self.name}: query must be one of {QUERIES}, got {self.query!r}")
        scale = self.stage1_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 1:
            raise ValueError(
                f"{self.name}: stage1_scale (tokens kept before the LLM, in units of the final budget) must be a "
                f"finite number >= 1, got {scale!r}"
            )

    def late_layer(self, model: ModelInfo) -> int:
        """The decoder layer at whose input stage 2 prunes."""
        if self.layer is not None:
            return self.layer
        return model.scale_layers((REFERENCE_LAYER,), REFERENCE_DEPTH)[0]

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layer = self.late_layer(model)
        model.check_layer(self.name, "layer", layer, minimum=1)
        source = relevance_layer(model, layer)
        if source is None:
            types = model.layer_types
            usable = model.softmax_layers()
            hint = f"layer must be at least {usable[0]}" if usable else "this model has none"
            raise ValueError(
                f"{self.name}: layer={layer} has no softmax-attention layer at or before it whose attention could "
                f"rank the image tokens (layers 0-{layer} are {', '.join(sorted(set(types[: layer + 1])))}); {hint}"
            )
        if self.drop_all:  # keep = what the LLM receives; scale 0: the late layer keeps no visual token
            return [Stage(layer=None), Stage(layer=layer, scale=0.0)]
        return [
            Stage(layer=None, scale=float(self.stage1_scale)),
            # attention_from == layer: the stage layer's own attention, recomputed from its input
            Stage(layer=layer, attention_from=source, query=self.query),
        ]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        """Stage 2: each remaining image token's cross-modal relevance (the query rows' head-averaged attention)."""
        return ctx.per_item(ctx.attention())

    def select(self, ctx: PruneContext) -> list[Tensor]:
        if ctx.stage.layer is not None and self.drop_all:  # budgets are 0 here
            return [torch.empty(0, dtype=torch.long, device=view.tokens.device) for view in ctx.items]
        if ctx.stage.layer is not None:
            return top_budget(ctx.items, self.score(ctx))
        selections = []
        for view in ctx.items:
            members = view.selectable.nonzero().squeeze(1)
            selections.append(members[diverse_subset(view.features[members], view.budget, self.variant)])
        return selections
