"""FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (arXiv 2412.01818), https://github.com/Theia-4869/FasterVLM.

Each image token is scored by the head-averaged attention of the vision tower's [CLS] token in the single layer
whose output LLaVA projects (``attentions[-2]``, the penultimate layer of CLIP). Before the LLM, each view keeps its
``keep`` best tokens in original order: LLaVA-1.5 has one view per image, LLaVA-NeXT a base view and several crops,
each with its own [CLS] and its own budget (the authors' "29 x 5 = 145"); the image-newline tokens are always kept.
A crop partly removed by LLaVA-NeXT's unpadding keeps at most the tokens it still has. The [CLS] rows are recomputed
from the tower's queries and keys (SDPA stays on). Qwen2-VL / Qwen2.5-VL have no [CLS]: a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method


@register_method
@dataclass
class FasterVLM(Method):
    """Keep each view's tokens with the largest [CLS] attention in the projected tower layer."""

    name = "fastervlm"
    summary = "[CLS] attention of the projected tower layer, budget per view, newlines kept"
    paper = "Zhang et al., arXiv 2412.01818 (Theia-4869/FasterVLM)"
    needs_cls_token = True

    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        model.require_cls_token(self.name)
        return [Stage(layer=None, per_crop=True, vision_layers=(model.vision_feature_layer,))]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        return [view.cls_attention[0] for view in ctx.items]
