"""MustDrop — Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model" (arXiv 2411.10803), https://github.com/liuting20/MustDrop (LLaVA-1.5 code: ``local_merge.py``,
``clip_encoder.py``, ``modelling_sparse_llama.py``); the merge as ModelTC/LightCompress's ``mustdrop.py`` places it.

Visual tokens are dropped over their whole lifecycle, in three stages:

1. Vision encoding, *local spatial merging* (before the LLM): each image's patch grid is tiled into non-overlapping
   ``window x window`` windows (3 x 3); a window's similarity is the mean cosine similarity of its tokens' features
   over all ordered pairs of distinct tokens; every window whose similarity is at least ``spatial_threshold`` is
   merged into its bottom-right token (the size-weighted average of its tokens, all of size one: their mean), the
   others stay untouched. The merged features are projected into the LLM as every other token.
2. Prefilling, *dual-attention filtering* at decoder layer ``layer`` (3 of 32, scaled to the model's depth): the instruction tokens' (the text after the
   last image) attention in layer ``layer - 1`` (the authors prune the output of layer 2 by layer 2's own attention)
   ranks the visual tokens twice: *global* attention (summed over the instruction rows; we average, same order) and
   *individual* attention (the largest of any one instruction row); the *key set* (the ``key_share`` of the tokens
   with the largest head-averaged [CLS] attention in the vision tower's last layer) is always kept.
3. Decoding, *output-aware cache policy*: after decode steps, the cached visual tokens the newest generated token
   attends to least in decoder layer ``layer`` leave the KV cache of every layer (``decode_ratio`` of each image's
   cached tokens per drop, key tokens last), through the engine's decode stages (``DecodeStage``).

Choices that are ours (where the code leaves things open or where we deviate), and why:

* Stage 1 runs on the features of the tower layer the projector reads (LightCompress's placement), not after the
  tower's first layer with the rest of the tower running on fewer tokens (the authors' ``clip_encoder.py``, threshold
  0.8): vtprune does not shorten the tower's own sequence for a VLM method. So the threshold defaults to
  LightCompress's 0.6, and a merged token's [CLS] attention (for the key set) is its bottom-right token's.
* Stage 1 merges per image, by its own similarities (the authors merge the batch's smallest count of windows in every
  image: batch results would depend on the batch); the most similar windows go first and merging stops where the
  image would fall below the wrap's final budget, so ``keep`` = all leaves the model dense. Grids not divisible by the
  window (the authors assert divisibility): windows tile from the top-left corner, and the rows and columns left
  over at the bottom and right are never merged. LLaVA-NeXT: each grid of an image (base view, high-resolution
  view) is tiled on its own; the row-end newline tokens stay.
* Stage 2 with a budget: the authors keep every token above either of two thresholds (``global_thr`` /
  ``individual_thr``, both 0.001 in their scripts), so the count varies, at layers 2, 6, 10 and 14. We filter once,
  to the wrap's budget: the key set first (by [CLS] attention, if it exceeds the budget), then alternately the next
  best token by global and by individual attention that is not kept yet, until the budget is met. The authors'
  cache step keeps only the final tokens in the caches of layers 2-14, a no-op with one filtering layer.
* Stage 3: the authors' code has no attention-based decode drops; the paper's abstract names the policy. We rank
  the cached tokens by the head-averaged attention of the step's newest token in decoder layer ``layer`` and drop
  ``decode_ratio`` of each image's cached tokens once, after the first decode step (``decode_every=0``), or after
  every ``decode_every``-th step; the key set goes last. Positions of later tokens are unchanged.
* Positions: renumbered after stages 1 and 2, as the authors' shortened sequence (``position_ids.narrow``) has them.

The key set needs the tower's [CLS] token (LLaVA-1.5, LLaVA-NeXT); ``key_share=0`` drops it and works on every
family with patch grids whose decoder layers all use full attention (decode drops compact every layer's cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.engine.decode import checked_decode_stages
from vtprune.core.layout import GridPart
from vtprune.core.registry import DecodeStage, Merged, Method, ModelInfo, Stage, register_method
from vtprune.core.signals import query_slots

# Stage 1 has no budget of its own (it merges by similarity, down to at most the final budget): its stage budget is
# every token of the image.
WHOLE_IMAGE = float(1 << 30)
# the authors filter at layer 3 of LLaVA-1.5's 32 (scored by layer 2's attention)
AUTHORS_LAYER, REFERENCE_DEPTH = 3, 32
# A key token's decode score: above every attention probability, so key tokens are dropped last.
KEY_BONUS = 2.0


def window_similarity(features: Tensor) -> Tensor:
    """Mean cosine similarity over ordered pairs of distinct tokens, per window: ``[windows, m, D] -> [windows]``."""
    unit = F.normalize(features.float(), dim=-1)
    sims = unit @ unit.transpose(1, 2)
    m = features.shape[1]
    off_diagonal = sims.sum((1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(1)
    return off_diagonal / (m * (m - 1))


def grid_windows(grid: GridPart, height: int, width: int) -> Tensor:
    """Item token indices of the complete ``height x width`` windows of ``grid`` tiled from its top-left corner,
    ``[windows, height * width]``, windows in raster order, tokens in raster order inside (bottom-right last)."""
    rows, cols = grid.height // height, grid.width // width
    if rows == 0 or cols == 0:
        return torch.empty(0, height * width, dtype=torch.long)
    r = torch.arange(rows)[:, None, None, None] * height + torch.arange(height)[None, None, :, None]
    c = torch.arange(cols)[None, :, None, None] * width + torch.arange(width)[None, None, None, :]
    return (grid.offset + r * grid.row_stride + c).reshape(rows * cols, height * width)


def alternate_fill(head: Tensor, orders: list[Tensor], count: int) -> Tensor:
    """``head`` (its first ``count``), then in turn the best index of each of ``orders`` not taken yet, until
    ``count`` are taken (or every order is spent). A plain loop on the host: at most one pass over each order."""
    taken = head[:count].tolist()
    seen = set(taken)
    lists = [order.tolist() for order in orders]
    cursors = [0] * len(lists)
    turn = 0
    while len(taken) < count and any(c < len(o) for c, o in zip(cursors, lists)):
        which = turn % len(lists)
        order = lists[which]
        while cursors[which] < len(order) and order[cursors[which]] in seen:
            cursors[which] += 1
        if cursors[which] < len(order):
            taken.append(order[cursors[which]])
            seen.add(order[cursors[which]])
        turn += 1
    return torch.tensor(taken, dtype=torch.long, device=head.device)


@register_method
@dataclass
class MustDrop(Method):
    """Merge similar 3x3 windows before the LLM, filter by dual attention at ``layer``, drop cached tokens while
    decoding (see the module docstring)."""

    name = "mustdrop"
    summary = (
        "similar 3x3 windows merged in the tower's output; global + individual text attention at layer 3; "
        "decode-time cache drops"
    )
    paper = "Liu et al., arXiv 2411.10803 (liuting20/MustDrop)"
    needs_cls_token = True
    merges = True

    spatial_threshold: float = 0.6
    window_size: int = 3
    # None: the authors' layer 3 of LLaVA-1.5's 32, scaled to the model's depth (at least 1)
    layer: int | None = None
    key_share: float = 0.08
    decode_ratio: float = 0.25
    decode_every: int = 0
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.spatial_threshold <= 1.0:
            raise ValueError(
                f"{self.name}: spatial_threshold must lie in [-1, 1] (a cosine), got {self.spatial_threshold}"
            )
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 2:
            raise ValueError(f"{self.name}: window_size must be an int >= 2, got {self.window_size!r}")
        if not 0.0 <= self.key_share < 1.0:
            raise ValueError(f"{self.name}: key_share must lie in [0, 1), got {self.key_share}")
        if not 0.0 <= self.decode_ratio < 1.0:
            raise ValueError(
                f"{self.name}: decode_ratio must lie in [0, 1) (0: no decode drops), got {self.decode_ratio}"
            )
        if isinstance(self.decode_every, bool) or not isinstance(self.decode_every, int) or self.decode_every < 0:
            raise ValueError(
                f"{self.name}: decode_every must be an int >= 0 (0: once, after the first decode step), "
                f"got {self.decode_every!r}"
            )

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if self.key_share > 0:
            model.require_cls_token(self.name)
        layer = self._layer(model)
        checked_decode_stages(self, self.decode_stages(model, keep), model)  # refused here, before anything runs
        key_layers = (model.vision_layers - 1,) if self.key_share > 0 else ()
        return [
            Stage(layer=None, scale=WHOLE_IMAGE, encoder_features=True),
            Stage(layer=layer, attention_from=layer - 1, query="instruction", vision_layers=key_layers),
        ]

    def _layer(self, model: ModelInfo) -> int:
        if self.layer is None:
            return model.scale_layers((AUTHORS_LAYER,), REFERENCE_DEPTH, minimum=1)[0]
        model.check_layer(self.name, "layer", self.layer, minimum=1)
        return self.layer

    def decode_stages(self, model: ModelInfo, keep: Keep) -> list[DecodeStage]:
        if self.decode_ratio == 0:
            return []
        return [DecodeStage(layer=self._layer(model), keep=1.0 - self.decode_ratio, every=self.decode_every)]

    # -- stage 1: local spatial merging ------------------------------------------------------------------------
    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        if ctx.stage.layer is None:
            return [self.merge(view) for view in ctx.items]
        return self.filter(ctx)

    def merge(self, view: ItemView) -> Merged | Tensor:
        """Windows at least ``spatial_threshold`` similar merged into their bottom-right token, most similar first,
        down to at most the image's final budget."""
        members = view.selectable.nonzero().squeeze(1)
        windows = self.windows(view)
        if windows.numel() == 0:
            return members
        similarity = window_similarity(view.encoder_features[windows])
        size = windows.shape[1]
        floor = view.final_budget if view.final_budget is not None else view.budget
        room = max(0, (members.numel() - floor) // (size - 1))
        order = similarity.argsort(descending=True, stable=True)
        merged = order[similarity[order] >= self.spatial_threshold][:room]
        if merged.numel() == 0:
            return members
        sources = windows[merged, :-1].flatten()
        keep = view.selectable.clone()
        keep[sources] = False
        indices = keep.nonzero().squeeze(1)
        features = view.encoder_features[indices].clone()
        targets = torch.searchsorted(indices, windows[merged, -1])
        features[targets] = view.encoder_features[windows[merged]].float().mean(1).to(features.dtype)
        combined = torch.zeros(indices.numel(), dtype=torch.bool, device=indices.device)
        combined[targets] = True
        return Merged(indices, features, space="encoder", combined=combined)

    def windows(self, view: ItemView) -> Tensor:
        """Positions in ``view.tokens`` of the complete windows of the image's grids (whole windows only)."""
        parts = [grid_windows(grid, self.window_size, self.window_size) for grid in view.item.grids]
        if not parts:
            return torch.empty(0, self.window_size**2, dtype=torch.long, device=view.tokens.device)
        tokens = torch.cat(parts).to(view.tokens.device)
        return torch.searchsorted(view.tokens, tokens)  # before the LLM every token of the image is present

    # -- stage 2: dual-attention filtering ---------------------------------------------------------------------
    def filter(self, ctx: PruneContext) -> list[Tensor]:
        """Per image: the key set, then alternately the best remaining token by global and by individual attention."""
        global_attention = ctx.per_item(ctx.attention())
        individual = ctx.per_item(self.individual_attention(ctx))
        keys = ctx.state.setdefault("mustdrop_keys", {})
        selections = []
        for view, glob, indiv in zip(ctx.items, global_attention, individual):
            members = view.selectable.nonzero().squeeze(1)
            key = members[:0]
            if self.key_share > 0 and view.cls_attention is not None:
                count = min(members.numel(), math.ceil(self.key_share * members.numel()))
                ranked = view.cls_attention[-1][members].float().argsort(descending=True, stable=True)
                key = members[ranked[:count]]
            keys[view.item.index] = view.tokens[key]
            by_global = members[glob[members].float().argsort(descending=True, stable=True)]
            by_individual = members[indiv[members].float().argsort(descending=True, stable=True)]
            selections.append(alternate_fill(key, [by_global, by_individual], view.budget))
        return selections

    def individual_attention(self, ctx: PruneContext) -> Tensor:
        """Per slot, the largest attention any one instruction token pays it (head-averaged), ``[B, L]``."""
        rows, real = query_slots(ctx.layout, "instruction")
        return ctx.attention_rows(rows, real).amax(1)  # rows that do not count are zeros

    # -- stage 3: output-aware cache policy --------------------------------------------------------------------
    def decode_score(self, ctx: PruneContext) -> list[Tensor]:
        """The newest token's attention to each cached token; key tokens last to go."""
        keys = ctx.state.get("mustdrop_keys", {})
        scores = []
        for view, attention in zip(ctx.items, ctx.per_item(ctx.attention())):
            key = keys.get(view.item.index)
            bonus = torch.isin(view.tokens, key) * KEY_BONUS if key is not None else 0.0
            scores.append(attention + bonus)
        return scores
