"""DART — Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More" (EMNLP 2025, arXiv 2502.11494), https://github.com/ZichenWen1/DART; the rule as
ModelTC/LightCompress implements it (``llmc/compression/token_reduction/dart.py`` @ 9701d03, read to understand).

Instead of ranking tokens by importance, DART keeps the image tokens that duplicate the others least. At the input
of decoder layer K (default 2, the authors' ``--pruned_layer 2``; LightCompress's ``dart.yml`` uses
``pruning_loc: 5``, pass ``layer=5`` for it), per image:

1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` instruction tokens (the text after the image)
   whose keys in layer K-1's KV cache (after RoPE, all heads concatenated) have the largest L1 norm (4 and 4);
2. the hidden states entering layer K, passed through the language model's *final* norm (as the authors do), are
   compared by cosine similarity: for each pivot in turn, the not yet kept image tokens *least* similar to it are
   kept (the least duplicated with respect to that pivot);
3. the image pivots are kept too, the text pivots are not; the kept tokens keep their original positions, as the
   authors' ``keep_indexs`` do.

Only keys and hidden states are read, no attention map, so the model runs with SDPA / FlashAttention throughout.
All families.

Where we differ from the authors' code, or choose where it leaves things open (each also marked below):

* Batches: the authors run batch element 0 only (``any_states[0]``, one fixed image span at offset 35 with 576
  tokens). Here every sample of a batch, and every image of a sample, is pruned on its own: image pivots and kept
  tokens come from that image's tokens, text pivots from its sample's instruction (the text after its last
  image; the authors' "query" tokens are everything after the single image, the same thing there).
* Budget: the authors keep ``TOKEN_TOPK = budget // (pivot_image + pivot_text)`` tokens per pivot *plus* the image
  pivots (``4 + 8 * 16 = 132`` for the nominal 128; LightCompress ``4 + 8 * 15 = 124`` at ratio 0.7778). The engine
  keeps at most the budget, so the ``budget - pivot_image`` non-pivot tokens are shared out over the pivots:
  ``(budget - pivot_image) // pivots`` each, one more for each of the first ``(budget - pivot_image) % pivots``.
  A budget below ``pivot_image`` keeps that many image pivots.
* Pivot order: each pivot takes its tokens from what the pivots before it left, so the order matters. The authors
  iterate over a Python ``set`` of positions, whose order is an artefact of hashing; we take image pivots by
  descending key norm, then text pivots by descending key norm (the order in which their code lists them).
* Fewer tokens than pivots: an image with fewer tokens than ``pivot_image`` or an instruction shorter than
  ``pivot_text`` uses the tokens there are (the authors' ``topk`` would raise); with no instruction text at all, the
  image pivots share the whole budget.
* Keys: from layer K-1, the most recent KV cache before the pruned layer. On models whose layer K-1 has no KV cache
  (Qwen3.5's linear-attention layers) the keys come from the last softmax-attention layer before K; a clear error
  names the smallest ``layer`` that has one when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method
from vtprune.core.signals import query_slots


def least_duplicated(
    image_states: Tensor, image_key_norms: Tensor, text_pivot_states: Tensor, budget: int, pivot_image: int
) -> Tensor:
    """DART's selection for one image: indices of its ``budget`` kept tokens, image pivots first.

    ``image_states [n, D]`` and ``text_pivot_states [t, D]`` are hidden states in the space the similarities are
    measured in (after the final norm); ``image_key_norms [n]`` the L1 norms of the image tokens' keys.
    """
    n = image_states.shape[0]
    budget = min(budget, n)
    if budget <= 0:
        return torch.empty(0, dtype=torch.long, device=image_states.device)
    image_pivots = image_key_norms.float().topk(min(pivot_image, budget)).indices  # by descending key norm
    x = F.normalize(image_states.float(), dim=-1)
    pivots = torch.cat([x[image_pivots], F.normalize(text_pivot_states.float(), dim=-1)])
    similarity = pivots @ x.T  # [pivots, n] cosine similarities
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[image_pivots] = True
    # ours: the non-pivot budget shared out over the pivots so that exactly `budget` tokens are kept
    remaining, count = budget - image_pivots.numel(), pivots.shape[0]
    kept = [image_pivots]
    for j in range(count):
        quota = remaining // count + (1 if j < remaining % count else 0)
        if quota == 0:
            continue
        # the least similar (least duplicated) tokens no earlier pivot took
        picked = similarity[j].masked_fill(taken, float("inf")).topk(quota, largest=False).indices
        taken[picked] = True
        kept.append(picked)
    return torch.cat(kept)


def key_layer(model: ModelInfo, layer: int) -> int | None:
    """The decoder layer whose keys DART reads for a stage at ``layer``: ``layer - 1``, or the last softmax-attention
    layer before it where ``layer - 1`` keeps no keys (linear attention); None when there is none."""
    return model.last_softmax_layer(layer)


@register_method
@dataclass
class DART(Method):
    """Keep the image tokens least duplicated (lowest cosine similarity) with respect to key-norm pivots, at layer K."""

    name = "dart"
    summary = "pivots by key L1 norm at layer K-1; keep the image tokens least similar to them at layer K"
    paper = "Wen et al., EMNLP 2025, arXiv 2502.11494 (ZichenWen1/DART)"

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    positions: str = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, minimum in (("pivot_image", 1), ("pivot_text", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{self.name}: {name} must be an int >= {minimum}, got {value!r}")

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.check_layer(self.name, "layer", self.layer, minimum=1)
        source = key_layer(model, self.layer)
        if source is None:
            types = model.layer_types
            usable = model.softmax_layers()
            hint = f"layer must be at least {usable[0] + 1}" if usable else "this model has none"
            raise ValueError(
                f"{self.name}: layer={self.layer} has no softmax-attention layer before it whose keys could choose "
                f"the pivots (layers 0-{self.layer - 1} are {', '.join(sorted(set(types[: self.layer])))}); {hint}"
            )
        return [Stage(layer=self.layer, states_from=source)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        if ctx.final_norm is None or ctx.hidden_states is None:
            raise RuntimeError(f"{self.name} prunes inside the LLM: it needs the hidden states and the final norm")
        hidden = ctx.hidden_states
        key_norms = ctx.key_states().float().abs().sum((-2, -1))  # L1 over all heads' keys, [B, L]
        # text pivots of each sample: its instruction tokens with the largest key norms
        rows, real = query_slots(ctx.layout, "instruction")
        text_pivots = {}
        for b in {view.sample for view in ctx.items}:
            candidates = rows[b][real[b]]
            top = key_norms[b, candidates].topk(min(self.pivot_text, candidates.numel())).indices
            text_pivots[b] = ctx.final_norm(hidden[b, candidates[top]])
        selections = []
        for view in ctx.items:
            members = view.selectable.nonzero().squeeze(1)
            slots = view.slots[members]
            chosen = least_duplicated(
                ctx.final_norm(hidden[view.sample, slots]),
                key_norms[view.sample, slots],
                text_pivots[view.sample],
                view.budget,
                self.pivot_image,
            )
            selections.append(members[chosen])
        return selections
