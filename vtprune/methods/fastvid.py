"""FastVID — Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (NeurIPS 2025,
arXiv 2503.11187), https://github.com/LunarShen/FastVID @ a40a109cb8df20e8c2c17c6850f8269717369990.

Reference followed: the authors' Qwen2.5-VL code, ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/
modeling_qwen2_5_vl.py`` (the vision attention in ``Qwen2_5_VLVisionFlashAttention2.forward``, the selection in
``Qwen2_5_VLForConditionalGeneration.forward``) and its ``scripts/eval.sh`` (defaults); the LLaVA-OneVision code
(``fastvid_llavaonevision/.../modeling_qwen2.py``) read for comparison. Read to understand, written anew.

Before the LLM, per video of ``T`` frames of ``N`` tokens (a Qwen "frame" is one temporal grid step):

1. **DySeg**: ``g_t`` = mean of the frame's projected (merged) tokens; ``s_t = cos(g_t, g_{t+1})``; the video is cut
   after frame ``t`` where ``s_t`` is among the ``c - 1`` smallest or ``s_t < tau``.
2. **Budget** per segment of ``n`` frames: ``R * n`` tokens (``R`` per frame, see Budget), of which
   ``context = max(int(R * n * d), 1)`` are merged anchors and ``salient = R * n - context`` kept as they are. A
   one-frame segment keeps ``salient`` and ``context`` in its frame. In a longer one, consecutive frames with
   ``s_t >= ignore`` (``DySeg_ignore``) collapse into a sub-segment of which only the last frame keeps tokens; the
   salient budget is split evenly over the ``m`` sub-segments (earlier ones take the remainder), the context budget
   evenly over ``ceil(m / p)`` anchor sub-segments counted back from the last (last, last - p, ...; the last takes
   the remainder), each capped at ``N // 2``, and a frame's salient count at ``N`` minus its context.
3. **ATS**: each frame keeps its top-``salient`` tokens by ``a_t``, the attention of a pseudo-[CLS] query (the mean
   of the frame's patch queries, per head) over keys averaged over each 2 x 2 merge unit, in the tower's last block
   (softmax, mean over heads), recomputed from that block's queries and keys (``Stage.vision_maps``) so the tower
   keeps running with SDPA / FlashAttention. This is the authors' formula exactly: the map averages the keys of a
   merge unit's four rows (which the tower holds next to each other) and gives each row its unit's value.
4. **Anchors**: among a frame's non-salient tokens, the top-``context`` DPC-kNN scores (``density * delta``, k = 4,
   ``vtprune.core.cluster.density_peaks``).
5. **DTM**: for each anchor frame, every token of its segment that is neither salient nor one of *that frame's*
   anchors (other frames' tokens and anchors included, as the authors do) joins its most cosine-similar anchor;
   ``anchor = w * anchor + (1 - w) * mean(joined)``, ``w = max(1 / (count + 1), beta)``.
6. Kept = salient tokens + merged anchors, in their original order; every kept token keeps its own position (Qwen's
   unpruned 3-D M-RoPE ids sliced, gaps preserved; a merged anchor takes the anchor's), as the authors slice
   ``position_ids``. The text after the video keeps HF's unpruned numbering.

Defaults = the authors' Qwen2.5-VL script: ``c=8, tau=0.84, ignore=0.95, d=0.4, p=4, beta=0.6`` (retention 0.27 is
the budget: ``keep=0.27``). Their LLaVA-OneVision script uses ``tau=0.9`` and no ``ignore``.

Budget (``keep``; the authors' knob is ``retention_ratio``):

* a float ``keep`` is the retention ratio: ``R = int(N * keep)`` per frame, as the authors compute it;
* an int ``keep`` counts tokens per video (ours: the authors have only the ratio): split evenly over the frames
  (earlier frames take the remainder), a segment's ``R * n`` being the sum over its frames;
* ``budget_unit="video"`` only: DySeg and the anchor frames move budget between a video's frames, which per-frame
  items (``budget_unit="frame"``) cannot see (a per-frame count is a float ``keep``);
* the caps of step 2 can leave a video below its budget, as in the authors' code.

Choices that are ours (the authors' code is silent, fails, or we deviate):

* ``keep`` covering a whole video (keep=1.0, or an int >= its tokens) keeps it untouched (dense); the authors' rules
  at ratio 1 would still cap and merge;
* ``d = 0`` gives no context at all (pure ATS pruning); the authors' ``max(..., 1)`` would still keep one anchor per
  segment; for ``d > 0`` their floor of one is kept;
* videos with fewer than ``c`` frames: ``c - 1`` is capped at the ``T - 1`` similarities (the authors' ``topk``
  fails there), so every frame is its own segment; ties in ``s_t`` go to the earlier frame;
* ``ignore=None`` turns the sub-segments off (each frame its own sub-segment);
* density ties go to the earlier token (``core.cluster``), not the authors' ``1e-6 * rand`` noise; ties in the
  attention top-k are torch's;
* the authors run one video per batch (``video_grid_thw[0]``); here each video of each prompt is handled alone,
  images pass through whole;
* similarities and merges are computed in float32 and cast back (the authors: the model dtype);
* families: the authors' code is Qwen2.5-VL; here every family whose adapter gives videos as frames and maps the
  tower's attention onto its tokens: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V (their towers hold each 2 x 2
  merge unit's four rows together, and every released config has ``spatial_merge_size=2``), and LLaVA-OneVision,
  whose authors' ``a_t`` is the original SigLIP checkpoint's MAP-head probe attention (a head HF's OneVision does
  not have): there the same pseudo-[CLS] attention is taken in the projected tower layer over the frame's patch
  keys (no merge units; its 2 x 2 bilinear pooling averages the rows' values per token), and ``g_t`` is the mean of
  the pooled tokens instead of the MAP head's pooled output. On Qwen3-VL ``g_t`` and the merges use the main
  embedding only (deepstack features of kept rows are sliced, a merged anchor keeps its own). Families without
  video input raise a clear error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep, split_budget
from vtprune.core.cluster import density_peaks, nearest_center
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import VisualItem
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method

DENSITY_NEIGHBOURS = 4  # the authors' k of the kNN density
# Families whose towers merge 2 x 2 patches into one LLM token, each unit's four rows next to each other
MERGE_UNIT = {"qwen_vl": 4, "qwen3_vl": 4, "qwen3_5": 4, "glm4v": 4, "llava_onevision": 1}


@dataclass(frozen=True)
class PseudoClsAttention:
    """The attention of a pseudo-[CLS] query over a frame's tokens (a ``Stage.vision_maps`` function; frozen, so
    equal maps are computed once).

    ``queries, keys [heads, rows, head_dim]`` of one frame: the query is the mean of the rows' queries (per head),
    the keys are averaged over each run of ``unit`` consecutive rows (a merge unit); softmax(q k^T * scale) averaged
    over heads gives one value per unit, returned for each of its rows ``[rows]`` (fp32)."""

    unit: int = 4

    def __call__(self, queries: Tensor, keys: Tensor, scale: float) -> Tensor:
        heads, rows, dim = keys.shape
        if rows % self.unit:
            raise RuntimeError(f"fastvid: a frame of {rows} tower rows is not made of merge units of {self.unit}")
        query = queries.float().mean(1, keepdim=True)  # [heads, 1, dim]
        merged = keys.float().view(heads, rows // self.unit, self.unit, dim).mean(2)
        weights = torch.softmax(query @ merged.transpose(1, 2) * scale, dim=-1)  # [heads, 1, units]
        return weights.mean((0, 1)).repeat_interleave(self.unit)


def frame_retention(keep: Keep, frames: int, per_frame: int) -> list[int]:
    """Tokens each of ``frames`` frames of ``per_frame`` tokens is budgeted: ``int(per_frame * keep)`` for a ratio
    (the authors'), an int ``keep`` per video split evenly (earlier frames take the remainder)."""
    if isinstance(keep, float):
        return [int(per_frame * keep)] * frames
    return split_budget(min(int(keep), frames * per_frame), [per_frame] * frames)


def video_budget(keep: Keep, item: VisualItem) -> int:
    """The tokens an item is budgeted (a ``Stage.budget_rule``): a video's frames' budgets summed; images whole."""
    if item.modality != "video":
        return item.num_selectable
    frames = item.num_frames
    return sum(frame_retention(keep, frames, item.num_selectable // frames))


def segment_video(similarity: Tensor, cuts: int, tau: float) -> list[int]:
    """DySeg: the segment sizes of a video whose consecutive frames have cosine ``similarity [T - 1]``: cut after
    the ``cuts`` least similar (ties: the earlier) and after every frame below ``tau``."""
    frames = similarity.numel() + 1
    order = torch.sort(similarity, stable=True).indices[: min(cuts, frames - 1)]
    cut = set(order.tolist()) | set((similarity < tau).nonzero().flatten().tolist())
    bounds = [-1, *sorted(cut), frames - 1]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


def even_split(total: int, parts: int) -> list[int]:
    """``total`` over ``parts`` as evenly as possible, the first ones taking the remainder (the authors' split)."""
    size, extra = divmod(total, parts)
    return [size + (1 if i < extra else 0) for i in range(parts)]


def segment_budgets(
    retain: int, similarity: Tensor, per_frame: int, d: float, p: int, ignore: float | None
) -> tuple[list[int], list[int]]:
    """(salient, context) counts per frame of one segment budgeted ``retain`` tokens, whose consecutive frames have
    cosine ``similarity [n - 1]`` (the authors' Qwen2.5-VL rule; see the module docstring)."""
    n = similarity.numel() + 1
    context = min(max(int(retain * d), 1), retain) if d > 0 else 0  # ours: d = 0 means no anchors
    salient = retain - context
    if n == 1:
        return [salient], [context]
    if ignore is None:
        sizes = [1] * n
    else:
        cuts = (similarity < ignore).nonzero().flatten().tolist()
        bounds = [-1, *cuts, n - 1]
        sizes = [b - a for a, b in itertools.pairwise(bounds) if b > a]
    m = len(sizes)
    sub_salient = even_split(salient, m)
    shares = even_split(context, math.ceil(m / p))
    sub_context = [0] * m
    for j, share in enumerate(shares):  # the last sub-segment, then every p-th one before it
        sub_context[m - 1 - j * p] = min(share, per_frame // 2)
    salient_counts, context_counts = [], []
    for size, s, c in zip(sizes, sub_salient, sub_context):
        salient_counts += [0] * (size - 1) + [min(s, per_frame - c)]
        context_counts += [0] * (size - 1) + [c]
    return salient_counts, context_counts


def dtm_merge(tokens: Tensor, anchors: Tensor, others: Tensor, beta: float) -> Tensor:
    """DTM: each row of ``tokens [M, D]`` indexed by ``others`` joins its most cosine-similar anchor (rows
    ``anchors``); returns the anchors' new features ``w * anchor + (1 - w) * mean(joined)``, ``w = max(1 / (count +
    1), beta)`` (an anchor nobody joins stays as it is)."""
    tokens = tokens.float()
    x = torch.cat([tokens[anchors], tokens[others]])
    center = nearest_center(x, torch.arange(anchors.numel(), device=x.device), metric="cosine")[anchors.numel() :]
    count = torch.bincount(center, minlength=anchors.numel()).float()
    total = torch.zeros_like(x[: anchors.numel()]).index_add_(0, center, tokens[others])
    mean = total / count.clamp(min=1)[:, None]
    weight = (1 / (count + 1)).clamp(min=beta)[:, None]
    return weight * tokens[anchors] + (1 - weight) * mean


@register_method
@dataclass
class FastVID(Method):
    """Dynamic temporal segments; per frame the most attended tokens plus density-peak anchors merged over the
    segment (DTM), before the LLM; images pass through."""

    name = "fastvid"
    summary = "video: dynamic segments, top pseudo-[CLS]-attended tokens + density-peak anchors merged per segment"
    paper = "Shen et al., NeurIPS 2025, arXiv 2503.11187 (LunarShen/FastVID)"
    merges = True
    budget_units = ("video",)

    c: int = 8
    tau: float = 0.84
    ignore: float | None = 0.95
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    positions: str = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()

        def number(value: object) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float))

        for field, low in (("c", 1), ("p", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "segments at least (DySeg_c)" if field == "c" else "frames per anchor frame (DTM_p)"
                raise ValueError(f"{self.name}: {field} must be an int >= {low}, the {what}; got {value!r}")
        if not number(self.tau) or not -1 <= self.tau <= 1:
            raise ValueError(f"{self.name}: tau must be a cosine in [-1, 1] (DySeg_tau), got {self.tau!r}")
        if self.ignore is not None and (not number(self.ignore) or not -1 <= self.ignore <= 1):
            raise ValueError(
                f"{self.name}: ignore must be a cosine in [-1, 1] (DySeg_ignore) or None (no sub-segments), "
                f"got {self.ignore!r}"
            )
        if not number(self.d) or not 0 <= self.d < 1:
            raise ValueError(f"{self.name}: d must lie in [0, 1), the context share (STPrune_d), got {self.d!r}")
        if not number(self.beta) or not 0 <= self.beta <= 1:
            raise ValueError(
                f"{self.name}: beta must lie in [0, 1], the anchor's least weight (DTM_beta), got {self.beta!r}"
            )

    def count_known_early(self) -> bool:
        return False  # DySeg's caps depend on the frames' content

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if "video" not in model.modalities:
            raise ValueError(
                f"fastvid prunes videos (temporal segments of frames), but {model.family_name or model.family} takes "
                f"no video input; for images use a per-image method"
            )
        unit = MERGE_UNIT.get(model.family)
        if unit is None or not model.tower_attention:
            raise ValueError(
                f"fastvid ranks a frame's tokens by a pseudo-[CLS] attention in the vision tower, which vtprune maps "
                f"onto the video tokens of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V and LLaVA-OneVision, not "
                f"{model.family_name or model.family}'s"
            )
        return [
            Stage(
                layer=None,
                modalities=("video",),
                vision_maps=((model.vision_feature_layer, PseudoClsAttention(unit)),),
                budget_rule=video_budget,
            )
        ]

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        return [self.select_video(view) for view in ctx.items]

    def select_video(self, view: ItemView) -> Tensor | Merged:
        """One item's selection: candidates whole (images, a budget covering the video), else FastVID's."""
        candidates = view.selectable.nonzero().squeeze(1)
        if view.item.modality != "video" or view.budget >= candidates.numel():
            return candidates
        frames = view.item.num_frames
        candidates, per_frame = view.video_frames("fastvid", "segments a video by whole frames")
        features = view.features[candidates].reshape(frames, per_frame, -1)
        attention = view.vision_maps[0][candidates].reshape(frames, per_frame)
        retain = split_budget(view.budget, [per_frame] * frames)  # the budget rule's per-frame counts, again
        rows, new, combined = fastvid_select(
            features, attention, retain, c=self.c, tau=self.tau, ignore=self.ignore, d=self.d, p=self.p, beta=self.beta
        )
        return Merged(indices=candidates[rows], features=new.to(view.features.dtype), combined=combined)


def fastvid_select(
    features: Tensor,
    attention: Tensor,
    retain: list[int],
    *,
    c: int = 8,
    tau: float = 0.84,
    ignore: float | None = 0.95,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
) -> tuple[Tensor, Tensor, Tensor]:
    """FastVID on one video: ``features [T, N, D]`` (projected tokens), ``attention [T, N]`` (``a_t``), ``retain``
    the tokens budgeted per frame. Returns the kept tokens' flat indices into ``T * N`` (ascending), their features
    (fp32; anchors merged) and whether each is a merged anchor."""
    per_frame = features.shape[1]
    x = features.float()
    glob = F.normalize(x.mean(1), dim=-1)
    similarity = (glob[:-1] * glob[1:]).sum(-1)
    sizes = segment_video(similarity, c - 1, tau)
    rows, values, merged = [], [], []
    start = 0
    for size in sizes:
        stop = start + size
        salient_counts, context_counts = segment_budgets(
            sum(retain[start:stop]), similarity[start : stop - 1], per_frame, d, p, ignore
        )
        tokens = x[start:stop].flatten(0, 1)  # the segment's tokens, [n * N, D]
        salient, anchors = [], []
        for offset, (s, k) in enumerate(zip(salient_counts, context_counts)):
            top = attention[start + offset].float().topk(s).indices
            salient.append(top + offset * per_frame)
            if k > 0:
                rest = torch.ones(per_frame, dtype=torch.bool, device=x.device)
                rest[top] = False
                rest = rest.nonzero().squeeze(1)
                score = density_peaks(x[start + offset, rest], DENSITY_NEIGHBOURS).score
                anchors.append(rest[score.topk(k).indices].sort().values + offset * per_frame)
        salient_rows = torch.cat(salient)
        rows.append(salient_rows + start * per_frame)
        values.append(tokens[salient_rows])
        merged.append(torch.zeros(salient_rows.numel(), dtype=torch.bool, device=x.device))
        for frame_anchors in anchors:  # DTM: the rest of the segment joins this frame's anchors
            others = torch.ones(tokens.shape[0], dtype=torch.bool, device=x.device)
            others[salient_rows] = False
            others[frame_anchors] = False
            rows.append(frame_anchors + start * per_frame)
            values.append(dtm_merge(tokens, frame_anchors, others.nonzero().squeeze(1), beta))
            merged.append(torch.ones(frame_anchors.numel(), dtype=torch.bool, device=x.device))
        start = stop
    flat, new, combined = torch.cat(rows), torch.cat(values), torch.cat(merged)
    order = flat.argsort()
    return flat[order], new[order], combined[order]
