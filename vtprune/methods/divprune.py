"""DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025), https://github.com/vbdi/divprune.

Token selection as a max-min diversity problem on the projected image tokens (the LLM's input embeddings): with
``D = 1 - cos`` between tokens, the first pick is the token whose nearest neighbour is farthest, then each step adds
the token whose minimum distance to the selected set is largest. Greedy, vectorised over candidates (one step per
kept token, updating each candidate's distance to the set). Before the LLM, original order, contiguous positions;
text-agnostic, all families (on LLaVA-NeXT the newline tokens are kept as structure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.greedy import greedy_max_min
from vtprune.core.registry import Method, ModelInfo, Stage, register_method


def max_min_diverse(features: Tensor, count: int) -> Tensor:
    """Greedy max-min diversity selection of ``count`` rows by cosine distance, in pick order."""
    x = F.normalize(features.float(), dim=-1)
    distance = 1 - x @ x.T
    n = distance.shape[0]
    count = min(count, n)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    # first pick: the largest nearest-neighbour distance (the 2nd smallest of each column, the smallest is itself)
    first = distance.topk(2, dim=0, largest=False).values[1].argmax()
    return greedy_max_min(distance, first, count)


@register_method
@dataclass
class DivPrune(Method):
    """Keep each image's most mutually diverse tokens (greedy max-min cosine distance), before the LLM."""

    name = "divprune"
    summary = "greedy max-min cosine diversity of the projected tokens"
    paper = "Alvar et al., CVPR 2025 (vbdi/divprune)"

    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        return [Stage(layer=None)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        selections = []
        for view in ctx.items:
            members = view.selectable.nonzero().squeeze(1)
            selections.append(members[max_min_diverse(view.features[members], view.budget)])
        return selections
