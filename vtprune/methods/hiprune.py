"""HiPrune — Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
Encoders" (arXiv 2508.00553), https://github.com/Danielement321/HiPrune (LLaVA: ``llava/model/llava_arch.py``
``encode_images``; Qwen2.5-VL: ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``).

Before the LLM, each image keeps tokens chosen from the vision tower's own attention hierarchy. The signal of a
tower layer is the attention each patch *receives*: averaged over heads and over every query token of its view
(the authors' "global attention", not the [CLS] row, which their code has commented out).

1. Anchors: the ``k_a = round(budget * alpha / 5)`` tokens with the largest signal in a middle ("object") layer:
   CLIP layer 9 of 24 on LLaVA, ViT block 16 of 32 on Qwen2.5-VL (1-based, the authors' ``HIPRUNE_OBJECT_LAYER``);
   other depths scale these proportionally (``round(9 * depth / 24)`` on LLaVA's CLIP towers, ``round(16 * depth /
   32)`` on the dynamic-resolution towers of the Qwen families and GLM-4V, at least 1) — our rule, the authors tune
   the layer per model.
2. Buffers: each anchor's 4 neighbours (left, right, above, below); anchors and buffers form the candidate set.
3. Registers: the rest of the budget goes to the tokens with the largest signal in the deep layer (the tower layer
   whose output the projector reads: CLIP's penultimate, Qwen's last block), candidates excluded.

Kept tokens stay in raster order; positions are contiguous on LLaVA (the authors insert only kept tokens) and the
original M-RoPE ids on Qwen (the authors slice ``position_ids``; vtprune's "renumber" is "keep" there).

The authors' buffers work on flat indices: ``cand = [a, a - 1, a + 1, a - W, a + W]`` clamped to ``[0, N - 1]``
(W = 24 on LLaVA, the merged-grid width on Qwen). So a token at the end of a row takes the first token of the next
row as its right "neighbour", a token in the top row gets token 0 for the one above (the last token for the one
below, in the bottom row), and duplicates collapse. ``buffer="flat"`` (default) follows that rule exactly;
``buffer="grid"`` takes the true 4-neighbours on the token grid (no wrap, nothing outside the grid). The candidate
count varies with these collisions in both, and the registers fill the budget up.

Budgets: ``keep`` per image (a fraction of its tokens, as the authors' Qwen ``HIPRUNE_QWEN_RETENTION``, or a
count, as their LLaVA ``HIPRUNE_RETENTION``). On LLaVA-NeXT it is the image's total, split over its views (base +
crops) as the authors split it (``int(RETENTION / views)``: 640 -> 5 x 128), each view choosing its own anchors,
buffers and registers; newlines are always kept.

Signals are recomputed from the tower's queries and keys (``Stage.vision_received``), one view (one Qwen image
frame) at a time in chunks of query rows, so the tower keeps running with SDPA / FlashAttention. On Qwen2.5-VL the
received attention is dense over the whole image, ignoring the window partition, as the authors' FlashAttention
path computes it, and each LLM token (a 2 x 2 merge of patches) takes the mean of its patches' signals.

Choices that are ours (the authors' code leaves them open or we deviate):

* Several images in a prompt, and videos (the authors run one image): each image, and each video frame on Qwen,
  is scored by its own queries only; the authors' Qwen code attends over every patch of the encoder call.
* LLaVA-NeXT: the authors choose on each crop's full 24 x 24 grid before unpadding and lose what the unpadding
  removes afterwards; here each view chooses among the tokens it still has, and buffers are taken on the image's
  token grids (the base view; the crops side by side in the unpadded high-resolution grid) and kept within the
  anchor's view. Both agree away from crop borders and unpadded edges.
* LLaVA-NeXT's split: in proportion to the tokens each view still has (largest remainder, so the image keeps
  exactly its budget and keep = all is the dense model); for views of equal size this is the authors' even split,
  whose ``int()`` drops the remainder (fewer than one token per view) that we hand out.
* Candidates beyond a view's budget (only possible for alpha near 1, where the authors' code fails) are cut,
  buffers before anchors.

Families: LLaVA-1.5, LLaVA-NeXT (CLIP towers), LLaVA-OneVision (SigLIP; video frames pooled 2x2 as their features,
CLIP's layer rule), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4V (their towers' attention mapped onto merged
tokens as the authors do for Qwen2.5-VL). Gemma 3, Mistral 3, InternVL, SmolVLM and PaliGemma raise a clear error:
their towers have the signal, but vtprune does not map it onto their (pooled, pixel-shuffled or merged) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep, split_budget
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# The authors' object layers (1-based) and the tower depths they chose them for.
AUTHORS_OBJECT_LAYER = {"clip": (9, 24), "qwen": (16, 32)}
BUFFERS = ("flat", "grid")


@register_method
@dataclass
class HiPrune(Method):
    """Anchors from a middle tower layer's received attention + their 4-neighbours, registers from the deep layer's."""

    name = "hiprune"
    summary = "anchors from a middle ViT layer's received attention + 4-neighbours, the rest from the deep layer's"
    paper = "Liu et al., arXiv 2508.00553 (Danielement321/HiPrune)"

    alpha: float = 0.1
    object_layer: int | None = None
    buffer: str = "flat"
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(
                f"{self.name}: alpha must lie in [0, 1] (anchors = round(budget * alpha / 5)), got {self.alpha!r}"
            )
        if self.buffer not in BUFFERS:
            raise ValueError(
                f"{self.name}: buffer must be one of {BUFFERS} ('flat': the authors' flat-index neighbours, "
                f"'grid': the token grid's 4-neighbours), got {self.buffer!r}"
            )

    def count_known_early(self) -> bool:
        return True

    def object_layer_of(self, model: ModelInfo) -> int:
        """The 1-based object layer on ``model``: the option, or the authors' layer scaled to the tower's depth."""
        if self.object_layer is not None:
            layer = self.object_layer
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= model.vision_layers:
                raise ValueError(
                    f"{self.name}: object_layer={layer!r} must be a 1-based tower layer in [1, {model.vision_layers}] "
                    f"({model.family_name}'s vision tower has {model.vision_layers} layers)"
                )
            return layer
        # CLIP's rule on LLaVA; Qwen2.5-VL's on the dynamic-resolution towers (Qwen, GLM)
        layer, depth = AUTHORS_OBJECT_LAYER["clip" if model.family.startswith("llava") else "qwen"]
        return min(model.vision_layers, max(1, round(layer * model.vision_layers / depth)))

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if not model.tower_attention or model.vision_layers == 0:
            raise ValueError(
                f"{self.name} ranks tokens by the attention they receive inside the vision tower, which vtprune maps "
                f"onto the tokens of LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, the Qwen-VL families and GLM-4V, not "
                f"{model.family_name}'s"
            )
        layers = sorted({self.object_layer_of(model) - 1, model.vision_feature_layer})
        return [Stage(layer=None, vision_received=tuple(layers))]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        layers = ctx.stage.vision_received
        shallow = layers.index(self.object_layer_of(ctx.model) - 1)
        deep = layers.index(ctx.model.vision_feature_layer)
        chosen = []
        for view in ctx.items:
            scores = view.received_attention.float()
            groups = view.groups if view.groups is not None else torch.zeros_like(view.tokens)
            members = view.selectable.nonzero().squeeze(1)
            views, sizes = torch.unique(groups[members], return_counts=True)
            kept = []
            # LLaVA-NeXT: the image's budget over its views (the authors' int(budget / views) for views of equal size)
            for group, budget in zip(views.tolist(), split_budget(view.budget, sizes.tolist())):
                part = members[groups[members] == group]
                kept.append(self._select_view(view, part, budget, scores[shallow], scores[deep]))
            chosen.append(torch.cat(kept))
        return chosen

    def _select_view(self, view: ItemView, members: Tensor, budget: int, shallow: Tensor, deep: Tensor) -> Tensor:
        """Anchors + buffers + registers among ``members`` (indices into the item's current tokens)."""
        if budget <= 0:
            return members[:0]
        anchors = members[shallow[members].topk(min(round(budget * self.alpha / 5), budget)).indices]
        candidates = torch.cat([anchors, neighbours(view, anchors, self.buffer)])
        # within this view, each once; anchors lead, so a budget too small for them all cuts buffers first
        candidates = first_occurrences(candidates[torch.isin(candidates, members)])[:budget]
        rest = members[~torch.isin(members, candidates)]
        registers = rest[deep[rest].topk(budget - candidates.numel()).indices]
        return torch.cat([candidates, registers])


def first_occurrences(values: Tensor) -> Tensor:
    """``values`` without repeats, each where it first appears."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.long, device=values.device)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel(), device=values.device), reduce="amin")
    return values[first.sort().values]


def neighbours(view: ItemView, anchors: Tensor, rule: str) -> Tensor:
    """The left, right, upper and lower neighbours of ``anchors`` (indices into the item's current tokens) on the
    item's token grids, as indices into its current tokens (neighbours it no longer has are left out).

    ``rule="flat"``: the authors' flat index ``f = row * width + col`` of the anchor's grid, ``f - 1, f + 1,
    f - width, f + width`` clamped to the grid (wrapping at row ends, token 0 / the last token at the top / bottom
    edge). ``rule="grid"``: only neighbours inside the grid."""
    found = []
    tokens = view.tokens[anchors]
    for grid in view.item.grids:
        local = tokens - grid.offset
        row, col = local.div(grid.row_stride, rounding_mode="floor"), local.remainder(grid.row_stride)
        inside = (local >= 0) & (row < grid.height) & (col < grid.width)
        row, col = row[inside], col[inside]
        if rule == "flat":
            flat = row * grid.width + col
            steps = torch.stack([flat - 1, flat + 1, flat - grid.width, flat + grid.width])
            steps = steps.clamp(0, grid.height * grid.width - 1)
            row, col = steps.div(grid.width, rounding_mode="floor"), steps.remainder(grid.width)
        else:
            row = torch.stack([row, row, row - 1, row + 1])
            col = torch.stack([col - 1, col + 1, col, col])
            valid = (row >= 0) & (row < grid.height) & (col >= 0) & (col < grid.width)
            row, col = row[valid], col[valid]
        found.append((grid.offset + row * grid.row_stride + col).flatten())
    if not found:
        return anchors[:0]
    wanted = torch.cat(found).to(view.tokens.device)
    index = torch.searchsorted(view.tokens, wanted).clamp(max=view.num_tokens - 1)
    return index[view.tokens[index] == wanted]
