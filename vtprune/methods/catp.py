"""CATP — Li, Yang, Shen, Han, Xu, Tang, "CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced
Multimodal In-Context Learning" (arXiv 2508.07871, 2025). No code release was found (searched GitHub and the paper
indexes by title and arXiv id); only the abstract could be read, which says: training-free, designed for multimodal
in-context learning (ICL: several image + text demonstrations, then the query image and question), two stages of
progressive pruning that "fully reflect the complex cross-modal interactions in the input sequence", 77.8 % of the
image tokens removed with a 0.6 % average gain on four LVLMs. Everything below the abstract's level is therefore
OUR design, written from that description; every rule is marked as ours.

Steps, per prompt of one or several images:

1. Stage 1, at the input of decoder layer 0 (before any decoder layer runs), per image: a greedy selection that
   balances feature *diversity* among the image's tokens and *alignment* with the image's own text. The image's text
   is the real text between it and the next image of its prompt (a demonstration's question and answer; for the
   query image, the question and answer template); images with no text before the next one (a video's frames)
   share the text after their run. With ``D = 1 - cos`` between the image's tokens (LLM input space) and
   ``a_j = max_t cos(x_j, t)`` over its text tokens' input embeddings, the first pick maximises
   ``(1 - alpha) * nn_j / 2 + alpha * (1 + a_j) / 2`` (``nn_j``: distance to the nearest other token), then each step
   adds the token maximising ``(1 - alpha) * min_{s in S} D[j, s] / 2 + alpha * (1 + a_j) / 2``: DivPrune's max-min
   diversity plus a text-alignment bonus, both in [0, 1]. Without text, or with ``alpha = 0``, it is DivPrune's
   rule exactly. It keeps ``stage1_scale`` (2) times the final budget.
2. Stage 2, at a shallow decoder layer K (2 of 32, scaled to the model's depth), every remaining image token of
   every image is scored by the attention the *query segment* pays it (the text after the prompt's last image,
   head- and row-averaged; its last token alone with ``query="last"``; the last token where a prompt ends with an
   image), recomputed from the queries and keys of layer K-1 (the last softmax-attention layer before K), so the
   model runs with SDPA / FlashAttention; each image keeps its top-``budget`` tokens. The query attends across all
   demonstrations' tokens, so a demonstration's tokens are kept for what the query reads in them.

Choices that are ours (the paper's rules could not be read), each also marked where it is made:

* Stage 1 runs at the input of decoder layer 0 rather than in a pre-LLM stage: only there does the context hold
  the hidden states of the whole prompt, i.e. the text around every image (a pre-LLM stage sees the instruction after
  the last image only). No decoder layer has run, so the cost is that of pre-LLM pruning; positions close the gaps
  as pre-LLM pruners do (``positions="renumber"``; M-RoPE families keep their 3-D ids).
* The image's text is the text *after* it (in ICL prompts a demonstration's question and answer follow its image),
  alignment is the max cosine over its text tokens, and the weight is ``alpha = 0.5``. The span is every real
  non-image token there, so it includes marker tokens around images (Qwen's ``<|vision_end|>`` /
  ``<|vision_start|>``, Gemma 3's ``<end_of_image>``) and chat-template words; a max over tokens lets the question's
  words dominate wherever they align better.
* Budgets stay per image at both stages (each image keeps its budget), where "contextually adaptive" could also
  mean moving budget between images; the engine caps every image at its own budget, so moving budget would need
  sample-level budgets in the core.
* Stage 2's layer (2 of 32, scaled; at least 1) and stage 1's multiple of the budget (2) are ours; on models whose
  first layers have linear attention (Qwen3.5) the default stage-2 layer moves to just after the first
  softmax-attention layer.

Applies to every family (its signals are the LLM's own embeddings and attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.greedy import greedy_max_min
from vtprune.core.layout import Layout
from vtprune.core.registry import Method, ModelInfo, Stage, register_method, top_budget
from vtprune.core.signals import query_slots

# ours: stage 2 at layer 2 of a 32-layer LLM (FastV's shallow layer), scaled to the model's depth
STAGE2_LAYER, REFERENCE_DEPTH = 2, 32
QUERIES = ("instruction", "last")


def aligned_diverse(features: Tensor, text: Tensor, count: int, alpha: float) -> Tensor:
    """Stage 1 for one image: ``count`` rows of ``features`` picked greedily by max-min cosine distance to the picks
    so far plus ``alpha`` times the alignment with ``text`` (max cosine to its rows), in pick order. Without text
    rows the alignment term is dropped (DivPrune's rule)."""
    x = F.normalize(features.float(), dim=-1)
    n = x.shape[0]
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    if text.shape[0] == 0:
        alpha, bonus = 0.0, x.new_zeros(n)
    else:
        bonus = (1 + (x @ F.normalize(text.float(), dim=-1).T).max(1).values) / 2  # alignment in [0, 1]
    distance = 1 - x @ x.T
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    # first pick: farthest nearest neighbour (DivPrune's start), plus the alignment bonus
    nearest = distance.topk(2, dim=0, largest=False).values[1]
    first = ((1 - alpha) * nearest / 2 + alpha * bonus).argmax()
    return greedy_max_min(distance, first, count, lambda closest: (1 - alpha) * closest / 2 + alpha * bonus)


def text_after_items(layout: Layout, items: list) -> dict[int, Tensor]:
    """Per item (by ``item.index``): the slots of the real text between it and the next item of its sample; an item
    followed directly by another (a video's frames) shares the text after that run (ours, see the module doc)."""
    spans: dict[int, Tensor] = {}
    text = layout.valid & ~layout.visual
    by_sample: dict[int, list] = {}
    for view in items:
        by_sample.setdefault(view.sample, []).append(view)
    for sample, views in by_sample.items():
        views = sorted(views, key=lambda v: int(v.slots.min()))
        following: Tensor | None = None
        for i in range(len(views) - 1, -1, -1):
            start = int(views[i].slots.max()) + 1
            end = int(views[i + 1].slots.min()) if i + 1 < len(views) else layout.length
            span = text[sample, start:end].nonzero().squeeze(1) + start
            if span.numel() == 0 and following is not None:
                span = following
            spans[views[i].item.index] = span
            following = span
    return spans


@register_method
@dataclass
class CATP(Method):
    """Two stages for multimodal ICL: per image, text-aligned diverse tokens at the LLM input; then the query's
    attention at a shallow layer (see the module doc; the rules are ours, after the paper's abstract)."""

    name = "catp"
    summary = "ICL: text-aligned max-min diversity per image at the input, then the query's attention at layer 2/32"
    paper = "Li et al., arXiv 2508.07871 (no code released)"

    layer: int | None = None  # stage 2's layer; None: 2 of 32, scaled (ours)
    alpha: float = 0.5  # weight of text alignment against diversity in stage 1 (ours)
    stage1_scale: float = 2.0  # stage 1 keeps this multiple of the final budget (ours)
    query: str = "instruction"
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in QUERIES:
            raise ValueError(f"{self.name}: query must be one of {QUERIES}, got {self.query!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"{self.name}: alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.stage1_scale, bool) or not isinstance(self.stage1_scale, (int, float)) or self.stage1_scale < 1:
            raise ValueError(f"{self.name}: stage1_scale must be a number >= 1, got {self.stage1_scale!r}")

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if self.layer is None:
            layer = model.scale_layers((STAGE2_LAYER,), REFERENCE_DEPTH, minimum=1)[0]
            if model.last_softmax_layer(layer) is None:  # linear-attention first layers (Qwen3.5): after the first
                usable = [i for i in model.softmax_layers() if i + 1 < model.num_layers]
                if not usable:
                    raise ValueError(f"{self.name}: {model.family_name or model.family} has no softmax-attention "
                                     "layer whose attention could rank the tokens before its last layer")  # fmt: skip
                layer = usable[0] + 1
        else:
            layer = self.layer
            model.check_layer(self.name, "layer", layer, minimum=1)
        source = model.softmax_source(self.name, layer)
        # ours: stage 1 at the input of layer 0, where the hidden states hold the text around every image
        return [
            Stage(layer=0, scale=float(self.stage1_scale)),
            Stage(layer=layer, attention_from=source, query=self.query),
        ]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        if ctx.stage.attention_from is None:
            return self._stage1(ctx)
        return top_budget(ctx.items, self.score(ctx))

    def _stage1(self, ctx: PruneContext) -> list[Tensor]:
        if ctx.hidden_states is None:
            raise RuntimeError(f"{self.name}: stage 1 needs the hidden states entering decoder layer 0")
        hidden = ctx.hidden_states
        spans = text_after_items(ctx.layout, ctx.items)
        alpha = float(self.alpha)
        selections = []
        for view in ctx.items:
            members = view.selectable.nonzero().squeeze(1)
            text = hidden[view.sample, spans[view.item.index]]
            chosen = aligned_diverse(hidden[view.sample, view.slots[members]], text, view.budget, alpha)
            selections.append(members[chosen])
        return selections

    def score(self, ctx: PruneContext) -> list[Tensor]:
        """Stage 2: the attention the query segment (or the last token) pays each image token."""
        layout = ctx.layout
        rows, real = query_slots(layout, self.query)
        if self.query == "instruction":  # a prompt ending with its image has no query text: its last token asks
            last, _ = query_slots(layout, "last")
            empty = ~real.any(1)
            rows, real = rows.clone(), real.clone()
            rows[empty, 0], real[empty, 0] = last[empty, 0], True
        return ctx.per_item(ctx.attention_of(rows, real))
