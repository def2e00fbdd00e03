"""VFlowOpt — Yang, Xu, Cui, Wang, Lin, Pang, "A Token Pruning Framework for LMMs with Visual Information
Flow-Guided Optimization" (ICCV 2025, arXiv 2508.05211), https://github.com/sihany077/VFlowOpt @ 129eeef (built on
iLLaVA, for LLaVA-OneVision-7B only: ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``,
``.../language_model/llava_qwen_training_free.py`` and the LLM stage in the vendored
``src/transformers-4.46.0/.../models/qwen2/modeling_qwen2.py``; read to understand).

Training-free and text-free: one importance map per image, computed once in the vision tower, drives every stage.

1. Importance (the end of the tower). In the tower layer whose output the projector reads (SigLIP layer 25 of
   LLaVA-OneVision-7B's 26, the authors' ``illava_vit_k=[25]``; ``vit_layer`` picks another), per view: ``A`` is the
   head-averaged attention map, ``recv = A.mean(0)`` the attention each token receives, the *sink* (global) tokens
   ``G = {j : recv_j > threshold * mean(recv)}`` and the importance ``imp = A[G].mean(0)``: the attention the sinks
   emit. Optionally ``imp += alpha * softmax(H)`` over the view's patches, ``H`` each patch's grey-level entropy
   (below); ``alpha = 0`` in every shipped config.
2. Before the LLM, per image: the lowest-importance tokens are removed and *recycled*: grouped by the cell
   ``(floor(row / cell), floor(col / cell))`` of their grid (the base view's and the unpadded high-resolution
   grid's, each in its own coordinates), each non-empty group becomes one token, the importance-weighted mean of its
   projected features written onto its most important member, which stays (``vtprune.kernels.merge_tokens``).
3. Inside the LLM, at the input of decoder layers 9 and 18 (0-based, of Qwen2-7B's 28; the authors'
   ``illava_llm_k=9-18``), the remaining image tokens with the lowest importance of step 1 are dropped (a recycled
   token has its representative's own importance, as the authors keep ``image_attn_map[to_keep_mask]``), keeping
   ``ratios[i]`` of them; no recycling there, no LLM attention read (the authors' cached path), so the model keeps
   SDPA / FlashAttention. The tower map is recomputed from the layer's queries and keys, one view at a time.

Defaults are the authors' active "10 %" config (``llava_onevision_training_free.py``, ``self.illava_config``):
``threshold = 39.2649``, ``alpha = 0``, ``cell = 17.3870``, ``ratios = (1.0, 0.6011)``; ``vit_r = 0.1166`` is the
budget (below). :data:`AUTHORS_PRESETS` holds their three configs. Those values come out of the authors'
*optimisation* (``llava_ov_opt_all.py``): a search over (threshold, alpha, cell, vit_r, ratios) on LLaVA-OneVision
training data for the pruning that best preserves the dense model's visual information flow. That search needs the
training data, the dense model's flow statistics and many evaluation passes; it is not part of a training-free
wrapper and is not reimplemented here: vtprune ships its results, found for LLaVA-OneVision-7B, and uses them
unchanged on other models.

Budget accounting. The authors' "10 %" is the average over the 28 decoder layers of the image tokens each layer
sees: ``vit_r = 0.1166`` after the tower, times 0.6011 from layer 18 on, ``(18 * 0.1166 + 10 * 0.0701) / 28 = 0.100``
(the 25 % and 50 % configs average the same way). So ``keep=0.1, budget="average"`` reproduces their schedule, and
``budget="final"`` (vtprune's default) counts the tokens left after the last stage; each stage keeps
``1 / prod(later ratios)`` times that (the core rounds each count from the final one; the authors chain
``n - round(n * (1 - r))``, at most a token apart).

Patch entropy (``alpha > 0``; ``SigLipVisionEmbeddings.forward``): each patch of the pixel tensor the tower receives
(normalised, times 255, cast to uint8 as the authors do, so negative values wrap around), grey = 0.3333 x the
channel sum, rounded to 256 levels; Shannon entropy in bits; a softmax over the view's patches. LLaVA-1.5, LLaVA-NeXT
and LLaVA-OneVision only (their towers embed square pixel patches of one image; a clear error elsewhere).

Choices that are ours (the authors' code leaves them open or we deviate; each also marked below):

* Budget of the recycling step. The authors remove the ``reduce + int(L / cell^2)`` lowest tokens
  (``reduce = round(L * (1 - vit_r))``) and keep one representative per non-empty cell, so they keep about, not
  exactly, ``L - reduce`` tokens (``int(L / cell^2)`` estimates the number of cells). vtprune keeps exactly the
  budget: of the removal counts whose kept + recycled tokens fill it, the one closest to the authors' (theirs
  whenever their estimate is exact). A budget below the number of cells keeps the groups with the most important
  representatives. An image whose budget covers it stays untouched (keep = all is the dense model).
* ``L`` counts an image's prunable tokens: LLaVA-OneVision's newlines are always kept and not counted (the authors
  give them importance 1.0 so they are never removed, but count them in ``L``).
* Which items recycle: every image with a token grid, on every family (the recycling is the paper's; the authors'
  code runs it on LLaVA-OneVision's multi-view images, its single-view and non-any-res paths take a plain top-k).
  Video frames take the plain top-k of their (2 x 2-pooled, on LLaVA-OneVision) importance, as the authors' video
  path does, but per frame: vtprune budgets each frame, the authors the whole video at once.
* No sink: on towers where no token receives ``threshold`` times the mean (e.g. random ones; the threshold was tuned
  on SigLIP's strong sinks), the authors' mean over an empty set is NaN; here the most-attended token is the sink.
* Positions: the authors insert only the kept tokens after the tower (positions renumbered) but slice the position
  ids inside the LLM (kept). vtprune applies one convention per method: ``positions="renumber"`` (default, the
  tower stage's, where most tokens go) or ``"keep"``. On M-RoPE families both keep the original positions.
* Batches and several images per prompt (the authors run batch 1 through an environment variable): every image of
  every sample is scored and pruned on its own.
* Other families (the authors release LLaVA-OneVision only, with Qwen2-VL LLM hooks): the same rule on the towers
  whose attention vtprune maps onto tokens, with the LLaVA-OneVision-tuned values. On LLaVA-1.5 / LLaVA-NeXT the
  [CLS] row takes part as a query and a key like every row of its view. On the Qwen families and GLM-4V
  a token's importance is the mean over the 2 x 2 patches it merges, each frame's rows attending in full (Qwen2.5-VL's
  windows ignored; its projected layer is a full-attention block); their cells count merged tokens.

Families: LLaVA-OneVision (the authors' model), LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and
GLM-4V. Gemma 3, Mistral 3, InternVL, SmolVLM and PaliGemma raise a clear error: their towers have the signal, but
vtprune does not map it onto their (pooled, pixel-shuffled or merged) tokens. An any-res LLaVA-OneVision image whose
grid the model shrinks by interpolation (``anyres_max_9``, more than about 11 views' worth of patches) has no
per-token signal and raises a clear error at prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import (
    Merged,
    Method,
    ModelInfo,
    Stage,
    register_method,
    top_budget,
)
from vtprune.core.signals import vit_received
from vtprune.kernels import merge_tokens

# The authors' LLM layers (0-based inputs, ``illava_llm_k=9-18``) and the depth they chose them for (Qwen2-7B).
AUTHORS_LAYERS, REFERENCE_DEPTH = (9, 18), 28
# The authors' three configs (alpha = 0 in each), by the average retention they give: wrap with keep=<key>,
# budget="average" and these options (their vit_r, the share kept after the tower, follows from the budget).
AUTHORS_PRESETS = {
    0.1: {  # vit_r 0.1166, the active one
        "threshold": 39.26492840997221,
        "cell": 17.386981849158786,
        "ratios": (1.0, 0.6011),
    },
    0.25: {  # vit_r 0.2651
        "threshold": 34.759552803070484,
        "cell": 15.580797034937687,
        "ratios": (0.9833433139039235, 0.8773258179532721),
    },
    0.5: {  # vit_r 0.7233
        "threshold": 28.683047941520474,
        "cell": 11.756787150848968,
        "ratios": (0.748747637472693, 0.487),
    },
}
# Families whose adapters hand out the pixel patches of their towers (patch entropy).
PIXEL_FAMILIES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}
# The most probabilities one chunk of sink rows holds (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SinkAttention:
    """The attention a view's sink tokens emit, per token (a ``Stage.vision_maps`` function; frozen, so the stages
    of one wrap share its values).

    ``A`` = softmax(q k^T * scale) averaged over heads; sinks = tokens whose received attention (``A`` averaged over
    queries) exceeds ``threshold`` times its mean; returns ``A[sinks].mean(0)``, ``[T]`` (fp32)."""

    threshold: float

    def __call__(self, queries: Tensor, keys: Tensor, scale: float) -> Tensor:
        received = vit_received(queries, keys, scale)  # chunked over query rows
        sinks = (received > self.threshold * received.mean()).nonzero().squeeze(1)
        if sinks.numel() == 0:  # ours: the authors' mean over no sinks is NaN; take the most-attended token
            sinks = received.argmax().view(1)
        heads, tokens, _ = keys.shape
        k = keys.float().transpose(1, 2)
        total = torch.zeros(tokens, dtype=torch.float32, device=keys.device)
        step = max(1, _CHUNK_ELEMENTS // (heads * tokens))
        for start in range(0, sinks.numel(), step):
            rows = queries[:, sinks[start : start + step]].float()
            total += torch.softmax(rows @ k * scale, dim=-1).sum((0, 1))
        return total / (heads * sinks.numel())


@dataclass(frozen=True)
class PatchEntropy:
    """Softmax over a view's patches of each patch's grey-level entropy in bits (a ``Stage.pixel_maps`` function):
    ``patches [P, C, p, p]`` as the tower receives them (normalised) -> ``[P]``, as the authors compute it."""

    def __call__(self, patches: Tensor) -> Tensor:
        # the authors' cast: normalised values times 255 to uint8 (torch truncates, then wraps modulo 256)
        values = (patches * 255).to(torch.uint8).float()
        grey = (values * 0.3333).sum(1).flatten(1).round().long()  # their weights, not 1/3
        histogram = torch.zeros(grey.shape[0], 256, dtype=torch.float32, device=grey.device)
        histogram.scatter_add_(1, grey, torch.ones_like(grey, dtype=torch.float32))
        probability = histogram / histogram.sum(1, keepdim=True)
        entropy = -(probability * torch.log2(probability + 1e-10)).sum(1)
        return torch.softmax(entropy, dim=0)


@register_method
@dataclass
class VFlowOpt(Method):
    """Sink-emitted tower attention; recycling merges before the LLM, then drops at LLM layers 9 / 18 of 28."""

    name = "vflowopt"
    summary = "attention emitted by the tower's sink tokens: recycling merges before the LLM, drops after 9 / 18 of 28"
    paper = "Yang et al., ICCV 2025 (sihany077/VFlowOpt)"
    merges = True

    threshold: float = 39.26492840997221
    alpha: float = 0.0
    cell: float = 17.386981849158786
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] = (1.0, 0.6011)
    vit_layer: int | None = None
    recycle: bool = True
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        bounds = {
            "threshold": ("> 0", lambda v: v > 0),  # the sinks receive more than threshold x the mean
            "alpha": (">= 0", lambda v: v >= 0),  # the entropy term's weight
            "cell": (">= 1", lambda v: v >= 1),  # the side of a recycling cell, in tokens
        }
        for name, (bound, holds) in bounds.items():
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or not holds(value):
                raise ValueError(f"{self.name}: {name} must be a finite number {bound}, got {value!r}")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"{self.name}: recycle must be True or False, got {self.recycle!r}")  # noqa: TRY004
        self.ratios = tuple(self.ratios)
        for ratio in self.ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(
                    f"{self.name}: ratios are the shares of the image tokens each LLM stage keeps, each in (0, 1], "
                    f"got {self.ratios!r}"
                )
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(self.layers) != len(self.ratios):
                raise ValueError(
                    f"{self.name}: layers {self.layers!r} and ratios {self.ratios!r} must have one entry per LLM stage"
                )

    def count_known_early(self) -> bool:
        return True  # the tower stage keeps exactly min(budget, tokens) per image

    def llm_layers(self, model: ModelInfo) -> list[int]:
        """The decoder layers (0-based inputs) of the LLM stages: the option, or the authors' 9 / 18 of 28 scaled."""
        if self.layers is not None:
            return list(self.layers)
        if len(self.ratios) != len(AUTHORS_LAYERS):
            raise ValueError(
                f"{self.name}: {len(self.ratios)} ratios need as many layers; the authors' layers are "
                f"{AUTHORS_LAYERS} of {REFERENCE_DEPTH}: pass layers=..."
            )
        # ours: proportional to the depth (9 / 18 of 28 -> 10 / 21 of 32, 1 / 3 of 4)
        return model.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)

    def tower_layer(self, model: ModelInfo) -> int:
        """The 0-based tower layer whose attention gives the importance: the option, or the projected layer."""
        if self.vit_layer is None:
            return model.vision_feature_layer
        layer = self.vit_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.vision_layers:
            raise ValueError(
                f"{self.name}: vit_layer={layer!r} must be a 0-based tower layer in [0, {model.vision_layers - 1}] "
                f"({model.family_name}'s vision tower has {model.vision_layers} layers)"
            )
        return layer

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if not model.tower_attention or model.vision_layers == 0:
            raise ValueError(
                f"{self.name} ranks tokens by the attention the vision tower's sink tokens emit, which vtprune maps "
                f"onto the tokens of LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, the Qwen-VL families and GLM-4V, not "
                f"{model.family_name or model.family}'s"
            )
        if self.alpha > 0 and model.family not in PIXEL_FAMILIES:
            raise ValueError(
                f"{self.name}: alpha > 0 adds the patch entropy, which needs the tower's pixel patches: "
                f"{', '.join(PIXEL_FAMILIES.values())} (not {model.family_name or model.family}); use alpha=0"
            )
        layers = self.llm_layers(model)
        if layers != sorted(set(layers)):
            raise ValueError(f"{self.name}: layers must increase, got {layers}")
        for layer in layers:
            model.check_layer(self.name, "layers", layer, minimum=1)
        signals = {  # every stage reads the one tower map (computed once per encoder call)
            "vision_maps": ((self.tower_layer(model), SinkAttention(float(self.threshold))),),
            "pixel_maps": (PatchEntropy(),) if self.alpha > 0 else (),
        }
        # stage i keeps 1 / (product of the later ratios) times the final budget
        scales = [math.prod(self.ratios[i:]) for i in range(len(self.ratios) + 1)]
        first = Stage(layer=None, scale=1 / scales[0], **signals)
        return [first] + [
            Stage(layer=layer, scale=1 / scale, **signals) for layer, scale in zip(layers, scales[1:])
        ]

    def importance(self, view: ItemView) -> Tensor:
        """Each current token's importance: the sinks' attention, plus ``alpha`` x the patch-entropy softmax."""
        values = view.vision_maps[0].float()
        if self.alpha > 0:
            values = values + self.alpha * view.pixel_maps[0].float()
        return values

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        scores = [self.importance(view) for view in ctx.items]
        if ctx.stage.layer is not None:  # inside the LLM: drop the least important, no recycling
            return top_budget(ctx.items, scores)
        chosen: list[Tensor | Merged] = []
        for view, importance, kept in zip(ctx.items, scores, top_budget(ctx.items, scores)):
            members = view.selectable.nonzero().squeeze(1)  # ours: newlines are structural, not in L
            # ours: every image with a grid recycles; video frames take the authors' video path, per frame
            recycles = self.recycle and view.item.modality == "image" and bool(view.item.grids)
            if view.budget >= members.numel() or not recycles:  # nothing removed, or a frame's plain top-k
                chosen.append(kept)
                continue
            cells = grid_cells(view, members, self.cell)
            chosen.append(recycle(view.features, members, importance[members], cells, view.budget, self.cell))
        return chosen


def grid_cells(view: ItemView, members: Tensor, cell: float) -> Tensor:
    """Per member (indices into the item's current tokens), its recycling cell: one id per (grid, floor(row / cell),
    floor(col / cell)) in that grid's own coordinates; -1 for tokens on no grid."""
    tokens = view.tokens[members]
    cells = torch.full((members.numel(),), -1, dtype=torch.long, device=members.device)
    first = 0  # the ids of a grid's cells follow the previous grid's
    for grid in view.item.grids:
        local = tokens - grid.offset
        row, col = local.div(grid.row_stride, rounding_mode="floor"), local.remainder(grid.row_stride)
        inside = (local >= 0) & (row < grid.height) & (col < grid.width)
        if not bool(inside.any()):
            continue
        # the authors' (point / a).floor() in float
        cell_row = (row[inside].float() / cell).floor().long()
        cell_col = (col[inside].float() / cell).floor().long()
        across = int(cell_col.max()) + 1
        cells[inside] = first + cell_row * across + cell_col
        first += (int(cell_row.max()) + 1) * across
    return cells


def recycle(features: Tensor, members: Tensor, importance: Tensor, cells: Tensor, budget: int, cell: float) -> Merged:
    """The tower stage on one image: ``budget`` of its ``members`` (indices into its current tokens, with their
    ``importance`` and grid ``cells``) stay; the others are removed, lowest importance first, and each cell's removed
    tokens are recycled into their most important member (importance-weighted mean of ``features``)."""
    count = members.numel()
    order = torch.sort(importance, stable=True).indices  # ascending: the authors remove from the front
    authors = min(count, max(0, budget - int(count / cell**2)))  # tokens their removal count leaves as they are
    kept_count = fill_budget(cells[order], budget, authors)
    removed, kept = order[: count - kept_count], order[count - kept_count :]
    removed_cells = cells[removed]
    grouped = removed_cells >= 0  # tokens on no grid are dropped, not recycled
    groups, slot = torch.unique(removed_cells[grouped], return_inverse=True)
    destination = torch.full_like(removed, -1)
    destination[grouped] = slot
    # each group's representative: its most important member, i.e. its last in ascending order
    rank = torch.arange(removed.numel(), device=removed.device)
    last = torch.full((groups.numel(),), -1, dtype=torch.long, device=removed.device)
    last.scatter_reduce_(0, slot, rank[grouped], reduce="amax")
    representatives = removed[last]
    spare = budget - kept_count
    if groups.numel() > spare:  # ours: a budget below the number of cells keeps the most important groups
        best = importance[representatives].topk(spare).indices
        renumber = torch.full((groups.numel(),), -1, dtype=torch.long, device=removed.device)
        renumber[best] = torch.arange(spare, device=removed.device)
        destination = torch.where(destination >= 0, renumber[destination.clamp(min=0)], destination)
        representatives = representatives[best]
    slots = representatives.numel()
    # the authors' weights / weights.sum() per group: merge_tokens' weighted mean with the importance as weights
    merged = merge_tokens(
        features[members[removed]][None], destination[None], importance[removed][None], max(slots, 1)
    )[0][:slots]
    sizes = torch.bincount(destination[destination >= 0], minlength=slots)
    indices = torch.cat([members[kept], members[representatives]])
    combined = torch.cat([torch.zeros_like(kept, dtype=torch.bool), sizes > 1])
    return Merged(indices, torch.cat([features[members[kept]], merged]), space="llm", combined=combined)


def fill_budget(ranked_cells: Tensor, budget: int, authors: int) -> int:
    """How many of the ``L`` tokens (their cells in ascending importance, -1: on no grid) stay as they are, so that
    they and one recycled token per cell among the removed fill ``budget`` exactly (ours; see the module docstring).

    Keeping ``k`` leaves ``f(k) = k + (cells among the L - k lowest)``, which grows by 0 or 1 with ``k`` from the
    number of cells (``k = 0``) to ``L``: the ``k`` with ``f(k) = budget`` form a range, and the one closest to the
    authors' ``authors`` is taken. A budget below the number of cells gives 0 (the caller keeps the best groups)."""
    count = ranked_cells.numel()
    first = torch.zeros(count, dtype=torch.bool, device=ranked_cells.device)
    on_grid = ranked_cells >= 0
    if bool(on_grid.any()):
        _, inverse = torch.unique(ranked_cells[on_grid], return_inverse=True)
        positions = torch.arange(count, device=ranked_cells.device)[on_grid]
        earliest = torch.full((int(inverse.max()) + 1,), count, dtype=torch.long, device=ranked_cells.device)
        earliest.scatter_reduce_(0, inverse, positions, reduce="amin")
        first[earliest] = True
    distinct = torch.cat([first.new_zeros(1, dtype=torch.long), first.long().cumsum(0)])  # cells among the r lowest
    fills = torch.arange(count + 1, device=ranked_cells.device) + distinct.flip(0)
    exact = (fills == budget).nonzero().squeeze(1)
    if exact.numel() == 0:
        return 0
    return min(max(authors, int(exact.min())), int(exact.max()))
