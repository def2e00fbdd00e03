"""PruneVid (Huang et al., ACL 2025 Findings, arXiv 2412.16117): static/dynamic token merging before the LLM, then
question-guided pruning inside it.

Reference: Visual-AI/PruneVid @ b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42, ``models/pllava/modeling_pllava.py``
(``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``, ``compute_cluster_vectors``, ``merge_frames_dynamic``),
``models/pllava/elastic_cache.py`` (``VTPWindowCache.process_attention`` / ``prompt_prefill``) and
``models/pllava/llama.py`` (``LlamaModelVTP.forward``: the selected layer's hook); defaults from ``scripts/eval.sh``.

Per video, on the projected features the LLM would receive (``T`` frames of ``N`` tokens):

1. frame descriptors (the mean of each frame's tokens) are clustered by DPC-kNN (``k`` = 7 neighbours) into
   ``int(T * temporal_segment_ratio)`` clusters; :func:`refine_clusters` makes every cluster one temporal run (a
   cluster keeps its longest run(s), other runs go to the neighbouring run that is longer, ties to the left, and a
   cluster whose runs all have one frame is dissolved); the runs are the segments;
2. per segment of ``W`` frames, a location is *static* when the mean cosine over all pairs of its ``W`` frames
   exceeds ``tau`` (0.8); a one-frame segment has no pairs (the reference divides 0 by 0: NaN, so every location
   is dynamic) and keeps that outcome;
3. the static locations become one token each (the mean over the segment's frames) and, when there are more than
   ``min_cluster_tokens`` (14), are clustered by DPC-kNN into ``int(count * cluster_ratio)`` (0.5) tokens, each the
   plain mean of its members;
4. each frame's dynamic tokens are clustered the same way (when more than 14);
5. inside the LLM, decoder layer ``selected_layer`` (the authors' 10 of 32, scaled with the depth) scores each
   visual token by the largest attention any head pays it from any token after the video (question and answer
   template); each segment's static group keeps its top ``int(size * alpha)`` and each frame's dynamic group its
   top ``int(size * alpha)`` (``alpha`` = 0.4); the rest leave the hidden states entering layer ``selected_layer+1``.

The DPC-kNN is vtprune's shared :mod:`vtprune.core.cluster` (exact ties to the earlier token instead of the
reference's ``1e-6`` random noise, so a selection is a function of its inputs).

Choices that are ours:

* **budget**: the authors have only ratios. With ``alpha=None`` (the default) ``keep`` counts the tokens a video
  finally keeps: the merge runs at the authors' ratios and the prune then spends exactly ``keep`` over the groups in
  proportion to their sizes (``alpha = keep / merged`` per video, largest remainders first, ties to the earlier
  group); if the merge alone left fewer tokens than ``keep``, all of them stay; ``keep`` = the whole video skips both
  steps (dense). With a number ``alpha`` the authors' per-group ``int(size * alpha)`` applies and ``keep`` only caps
  it (past the cap the proportional split above): ``keep=1.0, alpha=0.4`` is the reference's pipeline. Needs
  ``budget_unit="video"`` (the segments span frames);
* **where merged tokens sit** (``../shared/methods-video.md``, pitfall 1): a merged token takes one concrete source
  token's slot and position, never an average: a static token the location's token in the segment's first frame,
  a cluster its DPC centre's token. The reference instead writes each segment as [static, dynamic frame by frame]
  in cluster order; here tokens stay in the video's raster / time order;
* **positions**: the reference numbers the merged sequence consecutively and keeps those positions when it prunes
  inside the LLM; so ``positions="renumber"`` (the default) closes the merge's gaps on 1-D RoPE families
  (LLaVA-OneVision) and the in-LLM stage always keeps positions. On M-RoPE families (Qwen) vtprune keeps the model's
  own (t, h, w) ids of the kept tokens in both stages (the unwrapped model fed only the kept tokens);
* **the reference's retroactive KV slice**: after pruning at layer ``selected_layer`` it also slices the KV cache of
  layers ``0..selected_layer`` so decoding attends to the kept tokens only at every layer. Here the in-LLM stage
  declares ``Stage.earlier_caches``: once the prefill is done the dropped tokens leave those layers' caches before
  the first decode step (the record lists the cut as a decode drop of step 0); the prefill itself is the
  reference's. ``cut_earlier_caches=None`` (default) cuts wherever every layer's cache is full attention (on
  Qwen3.5's linear-attention layers there is no cache to cut: off there), ``False`` keeps the earlier layers'
  caches whole;
* the reference clusters ``int(T * 0.25)`` segments, 0 for ``T < 4`` (which fails); here at least one;
* its segments come from batch item 0 and it asserts batch 1; here every video gets its own, in any batch;
* the scoring rows are the real non-visual tokens after the video (another image's tokens there are skipped);
* the pair cosine sums the off-diagonal pairs exactly (the reference subtracts 1 per frame for self-similarity);
* families: the reference is PLLaVA only; here every family whose adapter gives videos as frames (Qwen2-VL,
  Qwen2.5-VL, ...); images pass through whole; families without video input refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.cluster import density_peak_centers, nearest_center
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method

AUTHORS_LAYER = 10  # selected_layer of 32 (LLaMA-7B in PLLaVA), 0-based
REFERENCE_DEPTH = 32
STATE_KEY = "prunevid_groups"


# -- segments ----------------------------------------------------------------------------------------------------
def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """(label, start, end inclusive) of each maximal run of equal labels."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i - 1))
            start = i
    return runs


def refine_clusters(labels: Tensor | list[int]) -> Tensor:
    """The reference's ``refine_clusters`` for one video: frame cluster labels ``[T]`` made temporally contiguous.

    Each cluster keeps its longest run(s) (every run of the maximal length); its other runs are freed; a cluster
    whose longest run has one frame is freed entirely. Left to right, each run of freed frames takes the label of
    the longer neighbouring run (ties and a missing right neighbour: the left one; no neighbour at all: label 0).
    """
    values = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    refined = list(values)
    runs_of: dict[int, list[tuple[int, int]]] = {}
    for label, start, end in _runs(values):
        runs_of.setdefault(label, []).append((start, end))
    for runs in runs_of.values():
        longest = max(end - start + 1 for start, end in runs)
        for start, end in runs:
            if longest == 1 or end - start + 1 != longest:
                refined[start : end + 1] = [-1] * (end - start + 1)
    count, i = len(refined), 0
    while i < count:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < count and refined[i] == -1:
            i += 1
        end = i - 1
        left_label = right_label = None
        left_length = right_length = 0
        if start > 0:  # measured on the labels refined so far (earlier freed runs already joined)
            left_label, j = refined[start - 1], start - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_length = start - 1 - j
        if end < count - 1:
            right_label, j = refined[end + 1], end + 1
            while j < count and refined[j] == right_label:
                j += 1
            right_length = j - end - 1
        if right_length > left_length:
            label = right_label
        else:
            label = left_label if left_label is not None else right_label
        refined[start : end + 1] = [0 if label is None else label] * (end - start + 1)
    device = labels.device if isinstance(labels, Tensor) else None
    return torch.tensor(refined, dtype=torch.long, device=device)


def segment_lengths(labels: Tensor) -> list[int]:
    """Lengths of the runs of equal labels in ``labels [T]`` (the reference's ``segment_lengths``, one video)."""
    return [end - start + 1 for _, start, end in _runs([int(v) for v in labels.tolist()])]


def video_segments(frames: Tensor, ratio: float, k: int) -> list[int]:
    """Segment lengths of a video ``frames [T, N, D]``: DPC-kNN on the frame means into ``max(1, int(T * ratio))``
    clusters, refined to temporal runs."""
    descriptors = frames.float().mean(1)
    centers = density_peak_centers(descriptors, max(1, int(frames.size(0) * ratio)), k)
    return segment_lengths(refine_clusters(nearest_center(descriptors, centers)))


def static_locations(segment: Tensor, tau: float) -> Tensor:
    """``segment [W, N, D]``: per location, whether the mean cosine over all pairs of its W frames exceeds ``tau``;
    all False for ``W = 1`` (no pairs: the reference's 0 / 0)."""
    frames = segment.size(0)
    if frames < 2:
        return torch.zeros(segment.size(1), dtype=torch.bool, device=segment.device)
    unit = F.normalize(segment.float(), dim=-1)
    similarity = torch.einsum("wnd,tnd->nwt", unit, unit)
    off_diagonal = similarity.sum((1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(1)
    return off_diagonal / (frames * (frames - 1)) > tau


def cluster_merge(
    features: Tensor, tokens: Tensor, ratio: float, k: int, minimum: int
) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN merge of ``features [n, D]`` standing on ``tokens [n]``: when ``n > minimum``, ``int(n * ratio)``
    clusters, each the plain mean of its members on its centre's token. Returns (tokens, features, combined)."""
    count = features.size(0)
    clusters = int(count * ratio)
    if count <= minimum or clusters >= count or clusters < 1:
        return tokens, features, torch.zeros(count, dtype=torch.bool, device=tokens.device)
    centers = density_peak_centers(features, clusters, k)
    assignment = nearest_center(features, centers)
    sums = torch.zeros(centers.numel(), features.size(1), dtype=torch.float32, device=features.device)
    sums.index_add_(0, assignment, features.float())
    sizes = torch.bincount(assignment, minlength=centers.numel())
    return tokens[centers], (sums / sizes[:, None]).to(features.dtype), sizes > 1


@dataclass
class VideoGroups:
    """What the merge left of one video, for the in-LLM prune: the tokens it kept (original numbering, ascending),
    each one's group, and per group its kind ("static" / "dynamic"), segment and frame (-1 for static groups)."""

    tokens: Tensor
    group: Tensor
    kinds: list[tuple[str, int, int]]


def merge_video(
    frames: Tensor, tokens: Tensor, *, ratio: float, tau: float, cluster_ratio: float, k: int, minimum: int
) -> tuple[Tensor, Tensor, Tensor, VideoGroups]:
    """PruneVid's merge of one video ``frames [T, N, D]`` whose tokens are ``tokens [T, N]`` (any numbering).

    Returns the kept tokens, their features, which of them combine several tokens, and the :class:`VideoGroups`
    (in the given numbering, ascending)."""
    kept, features, combined, group, kinds = [], [], [], [], []

    def add(where: Tensor, values: Tensor, merged: Tensor, kind: tuple[str, int, int]) -> None:
        if where.numel() == 0:
            return
        kept.append(where)
        features.append(values)
        combined.append(merged)
        group.append(torch.full_like(where, len(kinds)))
        kinds.append(kind)

    start = 0
    for segment, width in enumerate(video_segments(frames, ratio, k)):
        clip = frames[start : start + width]
        static = static_locations(clip, tau)
        # a static location becomes one token, on the segment's first frame
        mean = clip[:, static].float().mean(0).to(frames.dtype)
        add(*cluster_merge(mean, tokens[start, static], cluster_ratio, k, minimum), ("static", segment, -1))
        if width > 1 and bool(static.any()):
            combined[-1] = torch.ones_like(combined[-1])  # every static token averages the segment's frames
        for offset in range(width):
            frame = start + offset
            dynamic = ~static
            add(
                *cluster_merge(frames[frame, dynamic], tokens[frame, dynamic], cluster_ratio, k, minimum),
                ("dynamic", segment, frame),
            )
        start += width
    kept_tokens = torch.cat(kept)
    order = kept_tokens.argsort()
    groups = VideoGroups(tokens=kept_tokens[order], group=torch.cat(group)[order], kinds=kinds)
    return kept_tokens, torch.cat(features), torch.cat(combined), groups


# -- budgets -----------------------------------------------------------------------------------------------------
def proportional_quotas(sizes: list[int], budget: int) -> list[int]:
    """``budget`` split over groups of ``sizes`` in proportion to them (floors, then the largest remainders, ties to
    the earlier group); every group keeps everything when the budget covers them all."""
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    quotas = [size * budget // total for size in sizes]
    remainders = [size * budget - quota * total for size, quota in zip(sizes, quotas)]
    for index in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[: budget - sum(quotas)]:
        quotas[index] += 1
    return quotas


def group_quotas(sizes: list[int], budget: int, alpha: float | None) -> list[int]:
    """Tokens each group keeps: the authors' ``int(size * alpha)`` (capped by ``budget``), or with ``alpha=None``
    ``budget`` split in proportion to the groups (:func:`proportional_quotas`)."""
    if alpha is not None:
        quotas = [int(size * alpha) for size in sizes]
        if sum(quotas) <= budget:
            return quotas
    return proportional_quotas(sizes, budget)


def whole_item(keep: Keep, item: VisualItem) -> int:
    """The merge stage's budget: everything (the merge decides its own count; the prune spends ``keep``)."""
    return item.num_selectable


def rows_after_videos(layout: Layout, items: list[VisualItem]) -> tuple[Tensor, Tensor]:
    """The real non-visual slots after each sample's first video, ``[B, R]``, and which of them are real."""
    valid = layout.valid
    slots = torch.arange(layout.length, device=valid.device).expand_as(valid)
    video = torch.zeros_like(valid)
    for item in items:
        if item.modality == "video":
            video[item.sample] |= layout.item[item.sample] == item.index
    first = torch.where(video, slots, layout.length).min(1).values
    chosen = valid & ~layout.visual & (slots > first[:, None])
    counts = chosen.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.arange(width, device=valid.device)[None] < counts[:, None]


@register_method
@dataclass
class PruneVid(Method):
    """Merge each video's static tokens over DPC-kNN segments and cluster the rest before the LLM; then keep, per
    static group and per frame, the tokens the question attends to most at layer ``selected_layer``."""

    name = "prunevid"
    summary = "video: static/dynamic DPC-kNN merging over segments, then question-guided pruning at layer 10 of 32"
    paper = "Huang et al., ACL 2025 Findings, arXiv 2412.16117 (Visual-AI/PruneVid)"
    merges = True
    budget_units = ("video",)

    selected_layer: int | None = None
    alpha: float | None = None
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    cluster_ratio: float = 0.5
    k: int = 7
    min_cluster_tokens: int = 14
    # the reference's retroactive cut of layers 0..selected_layer's KV caches; None: where every layer's cache is
    # full attention (the cut cannot shorten a linear-attention state)
    cut_earlier_caches: bool | None = None
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()

        def number(value: object) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float))

        if self.alpha is not None and not (number(self.alpha) and 0 < self.alpha <= 1):
            raise ValueError(f"{self.name}: alpha must be None (from keep) or a number in (0, 1], got {self.alpha!r}")
        if not (number(self.tau) and -1 <= self.tau <= 1):
            raise ValueError(f"{self.name}: tau must be a cosine threshold in [-1, 1], got {self.tau!r}")
        for option in ("temporal_segment_ratio", "cluster_ratio"):
            value = getattr(self, option)
            if not (number(value) and 0 < value <= 1):
                raise ValueError(f"{self.name}: {option} must be a number in (0, 1], got {value!r}")
        for option, least in (("k", 1), ("min_cluster_tokens", 0)):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{self.name}: {option} must be an int >= {least}, got {value!r}")
        if self.cut_earlier_caches not in (None, True, False):
            raise ValueError(
                f"{self.name}: cut_earlier_caches must be None (where the caches allow it), True or False, "
                f"got {self.cut_earlier_caches!r}"
            )
        if self.selected_layer is not None and (
            isinstance(self.selected_layer, bool) or not isinstance(self.selected_layer, int)
        ):
            raise ValueError(
                f"{self.name}: selected_layer must be None (10 of 32, scaled) or an int, got {self.selected_layer!r}"
            )

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if "video" not in model.modalities:
            raise ValueError(
                f"prunevid merges and prunes videos (static tokens over temporal segments), but "
                f"{model.family_name or model.family} takes no video input; for images use a per-image method"
            )
        given = None
        if self.selected_layer is not None:  # named as the option here (output_pruned_layers says "layers")
            model.check_layer(self.name, "selected_layer", self.selected_layer, minimum=0)
            model.check_layer(self.name, "selected_layer (+1, where the drop happens)", self.selected_layer + 1, 1)
            given = (self.selected_layer,)
        [layer] = model.output_pruned_layers(self.name, given, (AUTHORS_LAYER,), REFERENCE_DEPTH)
        cut = self.cut_earlier_caches
        if cut is None:
            cut = all(kind == "full_attention" for kind in model.layer_types)
        return [
            Stage(layer=None, modalities=("video",), budget_rule=whole_item),
            # scored by layer l's own attention, dropped from its output (the reference keeps positions here); the
            # dropped tokens then leave layers 0..l's caches too, as the reference slices them
            Stage(layer=layer + 1, attention_from=layer, modalities=("video",), positions="keep", earlier_caches=cut),
        ]

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        if ctx.stage.layer is None:
            return self.merge(ctx)
        return self.prune(ctx)

    # -- stage 1: merging before the LLM -------------------------------------------------------------------------
    def merge(self, ctx: PruneContext) -> list[Tensor | Merged]:
        """Per video, :func:`merge_video` (a :class:`Merged`); images, and videos whose budget is all of them (with
        ``alpha=None``), pass whole."""
        groups = ctx.state.setdefault(STATE_KEY, {})
        selections: list[Tensor | Merged] = []
        for view in ctx.items:
            candidates = view.selectable.nonzero().squeeze(1)
            whole = self.alpha is None and (view.final_budget or 0) >= candidates.numel()
            if view.item.modality != "video" or whole:
                selections.append(candidates)
                continue
            candidates, per_frame = view.video_frames("prunevid", "compares each location across a segment's frames")
            shape = (view.item.num_frames, per_frame)
            kept, features, combined, video = merge_video(
                view.features[candidates].reshape(*shape, -1),
                candidates.reshape(shape),
                ratio=self.temporal_segment_ratio,
                tau=self.tau,
                cluster_ratio=self.cluster_ratio,
                k=self.k,
                minimum=self.min_cluster_tokens,
            )
            video.tokens = view.tokens[video.tokens]  # original numbering, for the in-LLM stage
            groups[view.item.index] = video
            selections.append(Merged(kept, features, space="llm", combined=combined))
        return selections

    # -- stage 2: question-guided pruning in the LLM ------------------------------------------------------------
    def prune(self, ctx: PruneContext) -> list[Tensor]:
        """Per video, the top tokens of each static / dynamic group by the largest attention any head pays them from
        the tokens after the video, ``group_quotas`` of each group."""
        groups = ctx.state.get(STATE_KEY, {})
        videos = [view for view in ctx.items if view.item.index in groups]
        scores = {}
        if videos:
            rows, real = rows_after_videos(ctx.layout, [view.item for view in ctx.items])
            attention = ctx.attention_rows(rows, real, per_head=True).amax(1)  # [B, R, L]; unreal rows are zeros
            for view in videos:
                after = real[view.sample] & (rows[view.sample] > int(view.slots.max()))
                per_row = attention[view.sample][:, view.slots] * after[:, None]
                scores[view.item.index] = per_row.amax(0) if per_row.size(0) else per_row.sum(0)
        selections = []
        for view in ctx.items:
            candidates = view.selectable.nonzero().squeeze(1)
            video = groups.get(view.item.index)
            if video is None or (self.alpha is None and view.budget >= candidates.numel()):
                selections.append(candidates[: view.budget] if video is None else candidates)
                continue
            selections.append(self._keep_per_group(view, video, scores[view.item.index], candidates))
        return selections

    def _keep_per_group(self, view: ItemView, video: VideoGroups, score: Tensor, candidates: Tensor) -> Tensor:
        where = torch.searchsorted(video.tokens, view.tokens[candidates]).clamp(max=video.tokens.numel() - 1)
        if not bool((video.tokens[where] == view.tokens[candidates]).all()):
            raise RuntimeError("prunevid: the in-LLM stage sees tokens its merge did not keep")
        member_group = video.group[where]
        present = sorted(set(member_group.tolist()))
        members = [candidates[member_group == g] for g in present]
        quotas = group_quotas([m.numel() for m in members], view.budget, self.alpha)
        chosen = [m[score[m].float().topk(q).indices] for m, q in zip(members, quotas) if q > 0]
        if not chosen:  # the authors' int(size * alpha) left nothing: the best token of the video stays
            chosen = [candidates[score[candidates].float().argmax()].view(1)]
        return torch.cat(chosen).sort().values
