"""VTC-CLS — Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (arXiv 2412.05819),
https://github.com/THU-MIG/VTC-CLS.

Each image token is scored by the head-averaged attention the vision tower's [CLS] token pays it, summed over the
tower layers ``start_layer`` ... the layer whose output LLaVA projects (layers 16-22 of CLIP ViT-L/14-336 with the
repository's default ``--layer 16``; the authors' ``attentions[start_layer:-1]``). The top ``keep`` tokens of each
image go to the LLM in their original raster order, before the LLM. The [CLS] rows are recomputed from the tower's
queries and keys, so the tower keeps running with SDPA.

Families: LLaVA-1.5 (the authors' setting) and LLaVA-NeXT (each token scored by its own view's [CLS], one budget
per image). Qwen2-VL / Qwen2.5-VL towers have no [CLS] token: a clear error names the methods that apply.
Selecting after the projector instead of before it picks the same tokens (the projector works per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# The repository's default start layer, for CLIP ViT-L/14 with 24 layers; other depths scale it.
DEFAULT_START_LAYER, REFERENCE_DEPTH = 16, 24


@register_method
@dataclass
class VTCCLS(Method):
    """Keep each image's tokens with the largest [CLS] attention summed over tower layers start_layer..feature layer."""

    name = "vtc_cls"
    summary = "[CLS] attention of the vision tower, summed over layers start_layer..penultimate"
    paper = "Wang et al., arXiv 2412.05819 (THU-MIG/VTC-CLS)"
    needs_cls_token = True

    start_layer: int | None = None
    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.require_cls_token(self.name)
        last = model.vision_feature_layer
        start = self.start_layer
        if start is None:
            start = min(last, round(DEFAULT_START_LAYER * model.vision_layers / REFERENCE_DEPTH))
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= last:
            raise ValueError(
                f"{self.name}: start_layer={start} must lie in [0, {last}] (the tower layer whose output LLaVA "
                f"projects; the tower has {model.vision_layers} layers)"
            )
        return [Stage(layer=None, vision_layers=tuple(range(start, last + 1)))]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        return [view.cls_attention.sum(0) for view in ctx.items]
