"""DyCoke: dynamic compression of tokens for fast video LLMs (Tao et al., CVPR 2025, arXiv 2411.15024).

Reference: KD-TAO/DyCoke @ dd7463498203479d0ff6f2d29c4e72928c0af244, ``llava/model/llava_arch.py::dycole_ttm``
(sic) and the "one_token" branch of ``prepare_inputs_labels_for_multimodal`` (stage 1);
``llava/model/language_model/modeling_qwen2.py`` (``PrunableDynamicCache.update / update_cache / dycoke_pruning``,
``Qwen2Model.forward``) (stage 2); defaults from ``lmms_eval/models/llava_onevision.py`` (``dycoke_l=3``,
``dycoke_p=0.8``, ``dycoke_k=0.7``). Reference model: LLaVA-OneVision-7B (a Qwen2 LLM of 28 layers).

Two independent stages:

1. **Temporal token merging (TTM)**, before the LLM, per video of ``T`` frames of ``N`` tokens (despite the name
   the reference drops, nothing is averaged). Pairs ``(0, 1), (2, 3), ...``: frame ``2i`` stays whole and frame
   ``2i + 1`` keeps its tokens least cosine-similar to the token at the same place in frame ``2i``. Then groups of
   four ``(i, .., i + 3)``, ``i = 0, 4, ...``: frame ``i + 2`` is replaced by its tokens least similar to frame
   ``i`` (both compared whole). So frames ``0, 4, 8, ...`` (the anchors) stay whole and every other frame keeps
   ``int((1 - k) * N)`` tokens (``k = 0.7``: 30 %).
2. **Decode-time KV pruning**, on every decode step: the newest token's head-averaged attention over the video's
   cached tokens in decoder layer ``l - 1`` is compared (cosine) with the previous step's; on the first step or
   when the cosine falls below 0.9, the top ``n * (1 - p)`` cached video tokens are chosen and decoder layers
   ``l ..`` attend to them (and to all text) only. The cache keeps every token (a per-step gather in the
   reference): the selection can change at every attention shift. It runs on the engine's masking decode stages
   (``DecodeStage(mask_from=l)``); ``ForwardRecord.decode_masks`` lists per step what was hidden.

Budget (ours; the authors have no token budget, their knob is ``k``): ``keep`` counts the video's tokens
(``budget_unit="video"``, the only unit accepted: the method moves budget between frames). The anchor frames stay
whole; the rest of the budget is spread evenly over the pruned frames (the first ones take one more token each
until it is used up; at most ``N`` each), so the video keeps exactly its budget, ``keep=1.0`` is the dense model,
and ``keep`` below the anchors' share keeps the anchors alone (the budget cannot go lower: anchors are whole by
construction). ``k=0.7`` instead applies the authors' count, ``int((1 - k) * N)`` per pruned frame, and ignores
``keep`` for videos. At T = 32 the authors' ``k = 0.7`` keeps 8 + 24 x 0.3 frames, about ``keep=0.475``.

Choices that are ours (the reference's quirks and what it leaves open):

* every frame follows the rule (frame ``f``: anchor when ``f % 4 == 0``, else compared with frame ``f - 1`` when
  odd, ``f - 2`` otherwise). The reference silently drops the last frame of an odd ``T`` (its pair loop covers
  pairs only) - a bug we fix: the frame is kept and pruned like any other; and its quadruple loop stops at
  ``i < T - 4``, so the last group's frame ``i + 2`` stays whole (frame 30 of 32) - we prune it, as the paper's
  description and every other group do;
* kept tokens stay in their original (raster, frame) order (the engine sorts selections); the reference
  concatenates each pruned frame's tokens in ``topk`` order; ties in similarity go to the earlier place (stable);
  the cosine is computed in float32;
* images pass through whole (DyCoke is a video method; EVS does the same); families without video input refuse;
* positions: ``positions="renumber"`` (the default, the reference's: OneVision's kept tokens are concatenated and
  numbered consecutively) closes the gaps on 1-D RoPE families; on Qwen's M-RoPE kept tokens keep their original
  3-D positions either way; LLaVA-OneVision's newline after the last frame is structural (always kept, not counted);
* stage 2 on stable steps: the paper reuses the previous selection; the reference code resets its index list on
  every step and so runs **unpruned** on stable steps. ``stable="reuse"`` (default, the paper) or ``"dense"``
  (the code);
* stage 2 reads the attention of layer ``l - 1`` exactly, recomputed from its query and cached keys (SDPA stays);
  the reference's explicit weights come from the same layer. ``l`` scales with the model's depth (3 of 28 layers,
  as MustDrop's and the other in-LLM methods' layers scale: an early layer of a deeper or shallower LLM; unchanged
  at 28 layers; at least 1 so that a layer below reads the attention);
* stage 2 keeps ``ceil(n * (1 - p))`` of the video's ``n`` cached tokens (the engine's rounding, at least one)
  where the reference keeps ``int(n * (1 - p))``; it works per video and per sample of a batch (the reference:
  batch 1, one video at a hard-coded offset) and its attention history is per generation (the reference keeps
  the previous vector across samples, so a new sample's first step compares with the last sample's);
* stage 2 masks, it does not gather: layers ``l ..`` still attend over the whole cache with the other video
  columns masked, so what the model attends to is the reference's but the decode-time attention compute is not
  reduced here (the reference gathers K/V per step), and cost reports count the whole cache while decoding;
* stage 2 needs every decoder layer to be full attention (refused on sliding-window / linear-attention families;
  ``p=0`` turns it off, and TTM alone applies there). In a composition (``"dycoke+fastv"``) stage 2 runs too:
  a composition forwards each part's decode stages to that part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep, tokens_to_keep
from vtprune.core.context import PruneContext
from vtprune.core.engine.decode import checked_decode_stages
from vtprune.core.layout import VisualItem
from vtprune.core.registry import DecodeStage, Method, ModelInfo, Stage, register_method

AUTHORS_LAYER = 3  # dycoke_l: decoder layers 3 .. attend to the selected visual tokens while decoding
REFERENCE_DEPTH = 28  # Qwen2-7B, the LLM of LLaVA-OneVision-7B
STABLE_MODES = ("reuse", "dense")


def frame_roles(frames: int) -> list[int]:
    """Per frame, the frame it is compared with (-1: an anchor, kept whole): odd frames with the previous one,
    frames ``4j + 2`` with frame ``4j``, frames ``4j`` are anchors (DyCoke's pairs and quadruples)."""
    return [-1 if f % 4 == 0 else (f - 1 if f % 2 else f - 2) for f in range(frames)]


def frame_counts(keep: Keep, frames: int, per_frame: int, k: float | None = None) -> list[int]:
    """Tokens each frame of a video keeps: anchors ``per_frame``; pruned frames ``int((1 - k) * N)`` (the authors'
    rule, ``k`` given) or an even share of what ``keep`` (the video's budget) leaves after the anchors."""
    roles = frame_roles(frames)
    pruned = [f for f, role in enumerate(roles) if role >= 0]
    counts = [per_frame] * frames
    if k is not None:
        share = int((1 - k) * per_frame)
        for f in pruned:
            counts[f] = min(per_frame, share)
        return counts
    if not pruned:
        return counts
    spare = max(0, tokens_to_keep(keep, frames * per_frame) - (frames - len(pruned)) * per_frame)
    base, extra = divmod(spare, len(pruned))
    for rank, f in enumerate(pruned):
        counts[f] = min(per_frame, base + (1 if rank < extra else 0))
    return counts


def merge_order(frames: Tensor, counts: list[int]) -> Tensor:
    """``frames [T, N, D]``: the kept flat indices (into ``T * N``, ascending) of DyCoke's temporal token merging
    with ``counts[f]`` tokens kept in frame ``f`` (anchors whole, others least similar to their reference frame)."""
    frames = frames.float()
    count, per_frame = frames.shape[:2]
    kept = []
    for f, role in enumerate(frame_roles(count)):
        if role < 0 or counts[f] >= per_frame:
            kept.append(torch.arange(per_frame, device=frames.device) + f * per_frame)
            continue
        similarity = F.cosine_similarity(frames[f], frames[role], dim=-1)
        least = torch.argsort(similarity, stable=True)[: counts[f]]  # least similar first, ties: earlier place
        kept.append(least + f * per_frame)
    return torch.cat(kept).sort().values


@register_method
@dataclass
class DyCoke(Method):
    """Keep anchor frames whole and the changed tokens of the frames between them (temporal token merging), then,
    while decoding, let the later layers attend only to the video tokens the newest token attends to most,
    re-chosen when that attention shifts."""

    name = "dycoke"
    summary = "video: anchor frames whole, others keep tokens changed since their anchor; decode-time KV selection"
    paper = "Tao et al., CVPR 2025, arXiv 2411.15024"
    budget_units = ("video",)

    positions: str = "renumber"
    k: float | None = None
    layer: int | None = None
    p: float = 0.8
    threshold: float = 0.9
    stable: str = "reuse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is not None and (isinstance(self.k, bool) or not 0.0 <= float(self.k) < 1.0):
            raise ValueError(f"{self.name}: k must be None (keep sets the count) or a float in [0, 1), got {self.k!r}")
        if isinstance(self.p, bool) or not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"{self.name}: p must lie in [0, 1) (0: no decode-time pruning), got {self.p!r}")
        if isinstance(self.threshold, bool) or not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"{self.name}: threshold must lie in [-1, 1] (a cosine), got {self.threshold!r}")
        if self.stable not in STABLE_MODES:
            raise ValueError(f"{self.name}: stable must be one of {STABLE_MODES}, got {self.stable!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"{self.name}: layer must be an int >= 1 or None, got {self.layer!r}")

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if "video" not in model.modalities:
            raise ValueError(
                f"dycoke prunes videos (frames against their anchor frames, then the video's cached tokens while "
                f"decoding), but {model.family_name or model.family} takes no video input; for images use a "
                "per-image method"
            )
        checked_decode_stages(self, self.decode_stages(model, keep), model)  # refused here, before anything runs
        return [Stage(layer=None, modalities=("video",), budget_rule=self.item_count)]

    def _layer(self, model: ModelInfo) -> int:
        if self.layer is None:
            return model.scale_layers((AUTHORS_LAYER,), REFERENCE_DEPTH, minimum=1)[0]
        model.check_layer(self.name, "layer", self.layer, minimum=1)
        return self.layer

    def item_count(self, keep: Keep, item: VisualItem) -> int:
        """Tokens a video keeps (:func:`frame_counts` summed); images keep every token."""
        if item.modality != "video":
            return item.num_selectable
        frames = item.num_frames
        return sum(frame_counts(keep, frames, item.num_selectable // frames, self.k))

    def select(self, ctx: PruneContext) -> list[Tensor]:
        selections = []
        for view in ctx.items:
            candidates = view.selectable.nonzero().squeeze(1)
            if view.item.modality != "video" or view.budget >= candidates.numel():
                selections.append(candidates)  # images (and a video kept whole) pass through
                continue
            frames = view.item.num_frames
            candidates, per_frame = view.video_frames(
                "dycoke", "compares each frame's tokens with the same places in an anchor frame"
            )
            counts = frame_counts(view.budget, frames, per_frame, self.k)  # the budget rule's total, per frame
            features = view.features[candidates].reshape(frames, per_frame, -1)
            selections.append(candidates[merge_order(features, counts)])
        return selections

    # -- stage 2: decode-time KV selection ---------------------------------------------------------------------
    def decode_stages(self, model: ModelInfo, keep: Keep) -> list[DecodeStage]:
        if self.p == 0:
            return []
        layer = self._layer(model)
        return [
            DecodeStage(layer=layer - 1, keep=1.0 - self.p, every=1, mask_from=layer, reuse=self.stable == "reuse")
        ]

    def decode_score(self, ctx: PruneContext) -> list[Tensor | None]:
        """Each video's attention from the newest token when it shifted (cosine to the previous step's below
        ``threshold``, or the first step), else None (reuse / unmask); images: None (never masked)."""
        history: dict[int, Tensor] = ctx.state.setdefault("dycoke_attention", {})
        scores: list[Tensor | None] = []
        for view, attention in zip(ctx.items, ctx.per_item(ctx.attention())):
            if view.item.modality != "video":
                scores.append(None)
                continue
            vector = attention[view.selectable]
            before = history.get(view.item.index)
            history[view.item.index] = vector  # compared with the next step's, as the reference does every step
            shifted = (
                before is None
                or before.shape != vector.shape
                or float(F.cosine_similarity(vector, before, dim=0)) < self.threshold
            )
            scores.append(attention if shifted else None)
        return scores
