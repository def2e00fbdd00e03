"""HoliTom — Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS 2025,
arXiv 2505.21334), https://github.com/cokeshao/HoliTom @ e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0
(``holitom/llava_arch.py``: ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``merge_tokens_by_clustering``;
``holitom/modeling_qwen2.py``: ``Qwen2Model_holitom.forward``; ``holitom/main.py``; ``scripts/*.sh``).

Two stages, both on videos only.

**Outer stage (before the LLM, per video** of ``T`` frames of ``N`` tokens, on the projected features the LLM would
receive):

1. per place, the cosine between consecutive frames, ``S [T-1, N]``;
2. global temporal segmentation by dynamic programming: a window ``[s, e]`` of frames saves
   ``(#static places) x (e - s)`` tokens, a place being static when its cosine exceeds ``tau`` for every consecutive
   pair inside the window; the windows (length 1 .. ``max_window``) that tile the video with the largest total saving
   are chosen (:func:`static_windows`, the authors' recurrence and tie-breaks: a longer window only when it saves
   strictly more);
3. the budget ratio is rescaled for what the windows saved, ``r' = min(r * total / (total - saved), 1)``;
4. in each window every static place becomes one token, its mean over the window's frames, and these are merged
   by DPC-kNN into ``round(N_static * r')`` centres (``k = min(K, centres)`` neighbours, as the authors' call;
   each centre becomes ``beta * centre + (1 - beta) * mean(its members)``, the authors' default without
   ``NO_BETA``); the dynamic places keep ``ceil(N_dyn * r')`` tokens per frame, of which ``1 - D`` go to the
   tokens with the largest attention received in the vision tower's last layer (mean over heads, then over every
   query) and ``D`` to DPC-kNN centres of the rest, merged by the same rule. The released scripts leave ``D``
   unset, so ``contextual=0.0`` (the default): the dynamic tokens are a pure top-k by attention.

**Inner stage (at LLM layer 18 of 28, scaled to the model's depth)**: the last prompt token's head-averaged
attention in the layer before ranks each video's tokens; the top ``(1 - inner_ratio)`` stay, and every other token
is averaged into the kept token whose hidden state is most cosine-similar, one after another in order
(``kept = (kept + other) / 2`` for each, the authors' double loop, so a later member weighs more than an earlier
one; reproduced in closed form). ``inner_ratio=0`` is the authors' "HoliTom (w/o M)": no inner stage.

Signals: the tower's received attention is vtprune's ``Stage.vision_received`` at ``ModelInfo.vision_feature_layer``
(the last tower layer whose output the LLM reads: the authors' ``attentions[-1]`` of LLaVA-OneVision's truncated
SigLIP), recomputed from the tower's queries and keys per frame; the LLM row is recomputed from layer ``K - 1``'s
queries and keys (``Stage.attention_from``), so SDPA stays on everywhere.

Choices that are ours (the paper is silent or we deviate from the code):

* **Budget.** ``keep`` counts the video tokens the LLM finally sees (after the inner stage), as every multi-stage
  vtprune method counts; the outer stage keeps ``keep / (1 - inner_ratio)`` of them (the authors' ``RETAIN_RATIO``
  is that outer share: their ``RETAIN_RATIO=0.1, HOLITOM_r=0.5`` is ``keep=0.05``; with ``inner_ratio=0``
  ``keep`` is ``RETAIN_RATIO``). A float is a fraction of each video's tokens, an int tokens per video
  (``budget_unit="video"``; ``"frame"`` is refused: the windows span frames). The authors' per-group ``ceil`` /
  ``round`` lets the count drift up to one token per frame and window above ``r * T * N``; here the outer budget
  is spread over the groups (each window's static tokens, each frame's dynamic tokens) in proportion to their
  sizes, ``n * r'``, by largest remainder, so a video keeps exactly its budget (or every token the windows left,
  when ``r'`` reaches 1). The inner stage keeps the engine's final budget (``round(L * (1 - r))`` of the
  authors' whenever the outer stage filled its budget) so ``keep`` is met even where the outer stage kept fewer.
* **keep = all is the dense model**: a budget covering the whole video leaves it untouched at either stage (the
  authors' code still averages static places over time at ``RETAIN_RATIO=1``).
* **Where a merged token sits** (pitfall 1 of ``methods-video.md``): a static token takes the slot, and so the
  position (Qwen's 3-D ``(t, h, w)``), of its place in the window's *first* frame; a contextual centre that of its
  centre token. Tokens keep vtprune's slot order (frames in order, raster order inside a frame), so a window reads
  static + first frame's dynamic tokens interleaved by place, then the later frames' dynamic tokens: the authors'
  LLaVA-Video ("grid") order; their LLaVA-OneVision order puts the window's static tokens before its first frame.
* **Positions**: ``positions="renumber"`` (the default, the authors'): after the outer stage positions are
  consecutive (1-D RoPE families), and the inner stage keeps them with their gaps (the authors' ``keep_indexs``);
  ``positions="keep"`` keeps the original positions at both stages. On Qwen's M-RoPE both keep each token's own 3-D
  position (see the README's Positions paragraph). In a composition the part's convention applies to both stages.
* Ties: top-k by attention is a stable descending sort (the earlier token wins a tie); DPC-kNN ties go to the
  earlier token (``vtprune.core.cluster``, no ``1e-6`` noise); merges are computed in float32.
* Images pass through whole at both stages (the authors' inner stage takes the first visual span, image or video);
  every video of a prompt is its own item at both stages (the authors: the first video only, batch 1).
* The spec (``../shared/methods-video.md``) says the contextual k-NN is ``min(K, count)``; the code passes
  ``min(K, cluster_num)`` (the number of centres), which we follow.

Families: videos on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V and LLaVA-OneVision (every family whose adapter
gives videos as frames and maps the tower's attention onto them); families without video input refuse it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep, split_budget
from vtprune.core.cluster import density_peak_centers, nearest_center
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.registry import Merged, Method, ModelInfo, Stage, register_method

AUTHORS_LAYER, REFERENCE_DEPTH = 18, 28  # HOLITOM_k=18 in the scripts, LLaVA-OneVision-7B's Qwen2 (28 layers)


def frame_similarity(frames: Tensor) -> Tensor:
    """``frames [T, N, D]``: the cosine of each place with the same place in the next frame, ``[T-1, N]``."""
    frames = frames.float()
    return F.cosine_similarity(frames[:-1], frames[1:], dim=-1)


def window_savings(similarity: Tensor, tau: float) -> Tensor:
    """``saving[s, e]``: the tokens a window of frames ``s..e`` saves, ``(#places static in it) x (e - s)``, a place
    being static when its cosine exceeds ``tau`` for every consecutive pair of the window (0 where ``e <= s``)."""
    frames = similarity.shape[0] + 1
    saving = torch.zeros(frames, frames, dtype=torch.long)
    above = (similarity > tau).long().cpu()
    for start in range(frames - 1):
        static = torch.cumprod(above[start:], dim=0).sum(dim=1)  # [m]: static over the pairs start..start+m
        length = torch.arange(1, static.numel() + 1)
        saving[start, start + 1 :] = static * length
    return saving


def static_windows(similarity: Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """The authors' ``select_static_windows``: windows ``(start, end)`` (inclusive) tiling the ``T`` frames that
    maximise the total saving (:func:`window_savings`), each at most ``max_window`` frames, and that saving.

    ``dp[i]`` is the best saving of frames ``0..i``: frame ``i`` alone (``dp[i-1]``), or a window of 2 .. max frames
    ending at ``i``, tried from the shortest; a window replaces the current best only when it saves strictly more.
    """
    frames = similarity.shape[0] + 1
    saving = window_savings(similarity, tau).tolist()
    best = [0] * frames
    start_of = [0] * frames
    for i in range(frames):
        value, start = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size  # the frames before the window
            candidate = (best[j] if j >= 0 else 0) + saving[j + 1][i]
            if candidate > value:
                value, start = candidate, j + 1
        best[i], start_of[i] = value, start
    windows = []
    i = frames - 1
    while i >= 0:
        windows.append((start_of[i], i))
        i = start_of[i] - 1
    return windows[::-1], best[-1]


def static_places(similarity: Tensor, window: tuple[int, int], tau: float) -> Tensor:
    """Boolean ``[N]``: the places static over every consecutive pair of ``window`` (none for a one-frame window)."""
    start, end = window
    if end == start:
        return torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    return (similarity[start:end] > tau).all(dim=0)


def density_merge(x: Tensor, count: int, k: int, beta: float) -> tuple[Tensor, Tensor]:
    """The authors' ``merge_tokens_by_density`` on the rows of ``x [n, D]``: ``count`` DPC-kNN centres
    (``min(k, count)`` neighbours), every other row joining its nearest centre (Euclidean), a centre with members
    becoming ``beta * centre + (1 - beta) * mean(members)``. Returns the centres (ascending) and their features."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device), x.new_zeros(0, x.shape[-1]).float()
    centers = density_peak_centers(x, count, k=min(k, count)).sort().values
    assignment = nearest_center(x, centers)
    x = x.float()
    members = F.one_hot(assignment, centers.numel()).T.float()  # [centres, n]
    members[torch.arange(centers.numel(), device=x.device), centers] = 0  # a centre is not its own member
    sizes = members.sum(dim=1, keepdim=True)
    means = members @ x / sizes.clamp(min=1)
    merged = torch.where(sizes > 0, beta * x[centers] + (1 - beta) * means, x[centers])
    return centers, merged


def top_by(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest ``scores`` (a stable descending sort: ties go to the earlier index)."""
    return torch.argsort(scores.float(), descending=True, stable=True)[:count]


@dataclass
class OuterPlan:
    """The outer stage's result on one video's ``T * N`` tokens (flattened frame-major): the rows that stay, the
    features they carry, whether each combines several tokens, and the windows chosen."""

    rows: Tensor
    features: Tensor
    combined: Tensor
    windows: list[tuple[int, int]]
    saved: int


def outer_stage(
    frames: Tensor,
    attention: Tensor,
    budget: int,
    *,
    tau: float = 0.8,
    contextual: float = 0.0,
    k: int = 7,
    beta: float = 0.6,
    max_window: int = 1024,
) -> OuterPlan:
    """HoliTom before the LLM on one video: ``frames [T, N, D]`` (projected features), ``attention [T, N]`` (each
    token's received tower attention), ``budget`` tokens to keep (the authors' ``r * T * N``)."""
    count, places, _ = frames.shape
    device = frames.device
    similarity = frame_similarity(frames)
    windows, saved = static_windows(similarity, tau, max_window)
    # groups in output order: per window its static places (if any), then each frame's dynamic places
    groups: list[tuple[str, int, Tensor]] = []
    for window in windows:
        static = static_places(similarity, window, tau)
        if bool(static.any()):
            groups.append(("static", window[0], static.nonzero().squeeze(1)))
        dynamic = (~static).nonzero().squeeze(1)
        for frame in range(window[0], window[1] + 1):
            groups.append(("dynamic", frame, dynamic))
    sizes = [int(g[2].numel()) for g in groups]
    # ours: r' * n per group, apportioned by largest remainder so the video keeps exactly min(budget, total - saved)
    counts = split_budget(min(budget, sum(sizes)), sizes) if sum(sizes) else [0] * len(sizes)
    rows, features, combined = [], [], []
    flat = frames.reshape(count * places, -1)
    window_of = {start: end for start, end in windows}
    for (kind, frame, members), keep in zip(groups, counts):
        if keep == 0:
            continue
        if kind == "static":  # one token per place (its mean over the window), DPC-kNN merged to `keep`
            end = window_of[frame]
            means = frames[frame : end + 1, members].float().mean(dim=0)
            centers, merged = density_merge(means, keep, k, beta)
            rows.append(frame * places + members[centers])  # the window's first frame holds the static tokens
            features.append(merged)
            combined.append(torch.ones(centers.numel(), dtype=torch.bool, device=device))
            continue
        dominant = round(keep * (1 - contextual))
        order = top_by(attention[frame, members], dominant)
        top = members[order].sort().values
        rows.append(frame * places + top)
        features.append(flat[frame * places + top].float())
        combined.append(torch.zeros(top.numel(), dtype=torch.bool, device=device))
        if keep > dominant:  # contextual tokens: DPC-kNN centres of the other dynamic tokens of this frame
            rest = members[~torch.isin(members, top)]
            centers, merged = density_merge(frames[frame, rest], keep - dominant, k, beta)
            rows.append(frame * places + rest[centers])
            features.append(merged)
            combined.append(torch.ones(centers.numel(), dtype=torch.bool, device=device))
    rows_t = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long, device=device)
    order = rows_t.argsort()
    return OuterPlan(
        rows=rows_t[order],
        features=torch.cat(features)[order] if features else frames.new_zeros(0, frames.shape[-1]),
        combined=torch.cat(combined)[order] if combined else torch.empty(0, dtype=torch.bool, device=device),
        windows=windows,
        saved=saved,
    )


def sequential_merge(hidden: Tensor, attention: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The authors' inner merge on one video's tokens (in order): the ``keep`` with the largest ``attention`` stay;
    each other token, in order, is averaged into the kept token whose hidden state is most cosine-similar
    (``kept = (kept + other) / 2``, assignments taken before any averaging). Closed form: a kept token with members
    ``o_1 < ... < o_m`` becomes ``h / 2^m + sum_j o_j / 2^(m - j + 1)``. Returns the kept indices (ascending), their
    new states and whether each absorbed any token."""
    chosen = top_by(attention, keep)  # in rank order: the authors' tie-break for equally similar kept tokens
    others = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    others[chosen] = False
    others = others.nonzero().squeeze(1)
    states = hidden.float()
    unit = F.normalize(states, dim=-1)
    target = (unit[others] @ unit[chosen].T).argmax(dim=-1)  # [others]: which kept token each joins
    onehot = F.one_hot(target, chosen.numel()).float()  # [others, kept]
    later = onehot.flip(0).cumsum(0).flip(0) - onehot  # members of the same kept token after this one
    weight = 0.5 ** ((later * onehot).sum(dim=1) + 1)  # the last member 1/2, the one before 1/4, ...
    members = onehot.sum(dim=0)
    merged = states[chosen] * (0.5**members)[:, None] + (onehot * weight[:, None]).T @ states[others]
    order = chosen.argsort()
    return chosen[order], merged[order], (members > 0)[order]


@register_method
@dataclass
class HoliTom(Method):
    """Video: DP-chosen static windows merged over time + dynamic tokens by tower attention before the LLM, then
    the last token's attention keeps ``1 - inner_ratio`` and merges the rest at LLM layer 18 of 28 (scaled)."""

    name = "holitom"
    summary = (
        "video: static windows by dynamic programming merged over time (DPC-kNN), dynamic tokens by tower "
        "attention; then attention-guided merging at LLM layer 18 of 28"
    )
    paper = "Shao et al., NeurIPS 2025, arXiv 2505.21334 (cokeshao/HoliTom)"
    merges = True
    budget_units = ("video",)

    tau: float = 0.8
    contextual: float = 0.0
    k: int = 7
    beta: float = 0.6
    max_window: int = 1024
    layer: int | None = None
    inner_ratio: float = 0.5
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low, high, text in (
            ("tau", -1.0, 1.0, "a cosine threshold in [-1, 1]"),
            ("contextual", 0.0, 1.0, "the share D of each frame's dynamic tokens merged, in [0, 1]"),
            ("beta", 0.0, 1.0, "the centre's weight in a merge, in [0, 1]"),
            ("inner_ratio", 0.0, 1.0, "the share merged away inside the LLM, in [0, 1) (0: no inner stage)"),
        ):
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high or (name == "inner_ratio" and value >= 1):
                raise ValueError(f"{self.name}: {name} must be {text}, got {value!r}")
        for name, text in (("k", "neighbours of the DPC-kNN density"), ("max_window", "frames in a window")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {name} ({text}) must be an int >= 1, got {value!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"{self.name}: layer must be None (18 of 28, scaled) or an int, got {self.layer!r}")

    def inner_layer(self, model: ModelInfo) -> int:
        """The decoder layer of the inner stage: ``layer``, or the authors' 18 of 28 scaled to ``model``."""
        if self.layer is None:
            return model.scale_layers((AUTHORS_LAYER,), REFERENCE_DEPTH, minimum=1)[0]
        model.check_layer(self.name, "layer", self.layer, minimum=1)
        return self.layer

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        family = model.family_name or model.family
        if "video" not in model.modalities:
            raise ValueError(
                f"holitom merges videos (static windows over frames, then inside the LLM), but {family} takes no "
                "video input; for images use a per-image method"
            )
        if not model.tower_attention or model.vision_layers == 0:
            raise ValueError(
                f"holitom ranks a video's dynamic tokens by the attention they receive in the vision tower, which "
                f"vtprune does not map onto {family}'s tokens"
            )
        outer = Stage(
            layer=None,
            scale=1 / (1 - self.inner_ratio),
            vision_received=(model.vision_feature_layer,),
            modalities=("video",),
        )
        if self.inner_ratio == 0:  # the authors' "HoliTom (w/o M)"
            return [outer]
        layer = self.inner_layer(model)
        source = model.softmax_source(self.name, layer, hint=" (or inner_ratio=0: no inner stage)")
        # the authors' inner stage keeps its tokens' positions (keep_indexs), whatever the outer stage did
        inner = Stage(
            layer=layer,
            attention_from=source,
            query="last",
            modalities=("video",),
            positions="keep" if self.positions == "renumber" else None,
        )
        return [outer, inner]

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        if ctx.stage.layer is None:
            return [self._outer(view) for view in ctx.items]
        attention = ctx.attention()
        return [self._inner(ctx, view, attention) for view in ctx.items]

    def _outer(self, view: ItemView) -> Tensor | Merged:
        candidates = view.selectable.nonzero().squeeze(1)
        if view.item.modality != "video" or view.budget >= candidates.numel():
            return candidates  # images, and a video whose budget covers it, pass through
        frames = view.item.num_frames
        candidates, places = view.video_frames("holitom", "compares each place with the same place in the next frame")
        plan = outer_stage(
            view.features[candidates].reshape(frames, places, -1),
            view.received_attention[0][candidates].reshape(frames, places),
            view.budget,
            tau=self.tau,
            contextual=self.contextual,
            k=self.k,
            beta=self.beta,
            max_window=self.max_window,
        )
        return Merged(candidates[plan.rows], plan.features, space="llm", combined=plan.combined)

    def _inner(self, ctx: PruneContext, view: ItemView, attention: Tensor) -> Tensor | Merged:
        candidates = view.selectable.nonzero().squeeze(1)
        if view.item.modality != "video" or view.budget >= candidates.numel():
            return candidates
        slots = view.slots[candidates]
        chosen, merged, combined = sequential_merge(
            ctx.hidden_states[view.sample, slots], attention[view.sample, slots], view.budget
        )
        return Merged(candidates[chosen], merged, space="llm", combined=combined)
