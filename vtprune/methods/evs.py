"""EVS, Efficient Video Sampling (Bagrov et al., NVIDIA, arXiv 2510.14624), as vLLM implements it.

Reference: ``vllm/multimodal/evs.py`` @ 094f117823287790739d3022162a3f30f13d758b (identical logic @ 926c71f6),
``compute_retention_mask`` and ``compute_retained_tokens_count``, called from ``_postprocess_video_embeds_evs`` in
``vllm/model_executor/models/qwen2_5_vl.py`` @ 002d181a55a03803d7d69547846630069d2378b8 (Qwen3-VL: the same rule).

The rule, per video, on the projected (post-merger) features the LLM would receive, ``T`` frames of ``N`` tokens in
raster order:

1. each token's dissimilarity is ``1 - cos`` to the token at the same place in the previous frame;
2. the first frame's tokens get 255 (more than any real dissimilarity, which is at most 2), so it ranks first;
3. one stable descending sort over the whole video (ties: the earlier frame, then the earlier raster place);
4. the video keeps the first ``max(N, int(T * N * (1 - q)))`` tokens of that order, in their original order.

So the budget is one per video, never per frame: the first frame is always whole and a later frame may keep
nothing (a static clip keeps frame 0 plus the remainder of the budget, spread over the patches that changed most).
The count depends on ``T``, ``N`` and ``q`` alone. Images are never pruned (vLLM only appends position columns to
them), so here they pass through whole.

Budget: vLLM's pruning rate ``q`` is ``1 - keep``: ``keep=0.25`` is ``--video-pruning-rate 0.75`` and keeps exactly
vLLM's count (``int`` of the product, not vtprune's usual rounding). vLLM has no default rate (the user sets it;
Nemotron-Nano-VL-V2 ships 0.7). The method needs ``budget_unit="video"`` (the default): per-frame budgets would
contradict its single top-k over the video.

Choices that are ours:

* an int ``keep`` (vLLM has only the rate) counts tokens per video, raised to one whole frame (``max(N, keep)``), so
  frame 0 is still complete;
* the cosine is computed in float32 (vLLM: in the embeddings' dtype, bf16 on GPU), which can reorder near ties;
* positions: kept tokens keep the model's own unpruned positions (Qwen's 3-D M-RoPE ids sliced, gaps preserved, as
  vLLM does for the video tokens), and the text after the video keeps HF's unpruned numbering (``max(t, h, w) + 1``
  of the full video) with HF's ``rope_deltas``, i.e. exactly the unwrapped model fed only the kept tokens; vLLM
  instead restarts that text at the video's start + its merged grid width, which differs for long or tall videos
  (see ``../shared/methods-video.md``, pitfall 1). On 1-D RoPE families (LLaVA-OneVision) ``positions="keep"``
  (the default) preserves the gaps likewise; ``"renumber"`` closes them;
* families: vLLM runs it on Qwen2.5-VL, Qwen3-VL and Nemotron-VL; here every family whose adapter gives videos as
  frames (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, LLaVA-OneVision); families without video input refuse
  it. On Qwen3-VL vLLM's cosine also spans the deepstack channels concatenated to the main embedding; here it uses
  the main embedding only. LLaVA-OneVision's newline after the last frame is structural (always kept, not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.layout import VisualItem
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

FIRST_FRAME = 255.0  # vLLM's constant for the first frame's dissimilarity (any real one is at most 2)


def retained_count(keep: Keep, frames: int, per_frame: int) -> int:
    """Tokens a video of ``frames`` frames of ``per_frame`` tokens keeps: vLLM's ``compute_retained_tokens_count``,
    ``max(N, int(T * N * (1 - q)))`` with ``1 - q = keep`` (an int ``keep``: ``max(N, min(keep, T * N))``)."""
    total = frames * per_frame
    count = int(total * keep) if isinstance(keep, float) else min(int(keep), total)
    return max(per_frame, count)


def item_count(keep: Keep, item: VisualItem) -> int:
    """:func:`retained_count` for one item (a video's selectable tokens split evenly over its frames)."""
    if item.modality != "video":
        return item.num_selectable
    return retained_count(keep, item.num_frames, item.num_selectable // item.num_frames)


def retention_order(frames: Tensor) -> Tensor:
    """``frames [T, N, D]``: indices into the flattened ``T * N`` tokens, most worth keeping first (vLLM's
    ``compute_retention_mask`` before its cut: 1 - cos to the previous frame, frame 0 first, stable sort)."""
    frames = frames.float()
    dissimilarity = 1 - F.cosine_similarity(frames[1:], frames[:-1], dim=-1)
    first = torch.full_like(frames[:1, :, 0], FIRST_FRAME)
    return torch.argsort(torch.cat([first, dissimilarity]).flatten(), descending=True, stable=True)


@register_method
@dataclass
class EVS(Method):
    """Keep each video's first frame and the tokens that changed most since the previous frame (one top-k per
    video, vLLM's count); images pass through."""

    name = "evs"
    summary = "video: drop patches similar to the same patch in the previous frame, one top-k per video (vLLM)"
    paper = "Bagrov et al., arXiv 2510.14624 (vLLM EVS)"
    budget_units = ("video",)

    positions: str = "keep"

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if "video" not in model.modalities:
            raise ValueError(
                f"evs prunes videos (each patch against the same patch in the previous frame), but "
                f"{model.family_name or model.family} takes no video input; for images use a per-image method"
            )
        return [Stage(layer=None, modalities=("video",), budget_rule=item_count)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        selections = []
        for view in ctx.items:
            candidates = view.selectable.nonzero().squeeze(1)
            if view.item.modality != "video" or view.budget >= candidates.numel():
                selections.append(candidates)  # images (and a video kept whole) pass through
                continue
            candidates, per_frame = view.video_frames(
                "evs", "compares each patch with the same patch in the previous frame"
            )
            features = view.features[candidates].reshape(view.item.num_frames, per_frame, -1)
            order = retention_order(features)
            selections.append(candidates[order[: view.budget]].sort().values)
        return selections
