"""ZOO-Prune — Kim, Zhang, Liu, Jung, Lee, Hong, "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in
Vision-Language Models" (arXiv 2509.24837, CVPR 2026), https://github.com/AIM-SKKU/ZOO-Prune (project page
aim-skku.github.io/ZOO-Prune). The reference is the authors' code: ``LLaVA/llava/model/llava_arch.py`` (LLaVA-1.5),
``llava_arch_llava_next_7b.py`` (LLaVA-NeXT) and ``run_zoo_prune.sh`` (its settings); it ships LLaVA only.

Before the LLM, each image (each view on LLaVA-NeXT) keeps the tokens that are both *sensitive* and *diverse*:

1. Sensitivity, a zeroth-order estimate of the projector's local Jacobian magnitude at each token's pre-projector
   feature ``x_i`` (the tower layer LLaVA projects): ``K`` random directions ``u_k`` (Gaussian, each scaled to unit
   L2 norm, the same ``K`` for every token), a step ``eps``, and two-sided differences through the projector ``P``::

       s_i = (1 / K) * sum_k || P(x_i + eps u_k) - P(x_i - eps u_k) ||_2 / (2 eps)

   Forward passes only (no backward), batched over tokens and directions. With unit directions and a linear
   ``P(x) = W x`` this is exactly the mean of ``||W u_k||``.
2. Sensitivity-aware diverse selection (the authors' SADS): sensitivities min-max normalised to ``w`` in [0, 1]
   within the view (all ones when they are all equal), cosine distances ``D = 1 - cos`` between the *projected*
   tokens (what the LLM receives); the first pick is the most sensitive token, then each step adds the unpicked
   token maximising ``w_j * min_{s in S} D[s, j]`` (DivPrune's max-min diversity weighted by sensitivity). Ties go to
   the lowest index, as ``torch.argmax`` gives them to the authors.

Kept tokens keep their order with contiguous positions (the authors slice the embeddings; LLaVA renumbers).
Defaults are the authors' ``run_zoo_prune.sh``: ``K = 64`` directions (``NOISERECOV_NUM``), ``eps = 0.01``
(``NOISERECOV_INTENS``). SDPA / FlashAttention compatible: no attention map and no text are needed.

Families: those whose projector maps each tower token on its own (``ModelInfo.per_token_projector``) through a
non-linear MLP: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision. The others raise a clear ValueError from ``stages()``.

Choices that are ours (the paper or the code leaves them open, or we deviate):

* Refusing Qwen-VL / GLM-4V (2x2 merger), Gemma 3 (4x4 pooling), Mistral 3 (patch merger), InternVL and SmolVLM
  (pixel shuffle) rather than perturbing each merged token's group of input rows together: the adapters hand
  methods those groups' pre-merger rows averaged (one row per LLM token), which cannot be fed back through the
  merger, and each merger has its own layout (Qwen2.5-VL's window order, Gemma 3's pooling before its norm); the
  group-wise estimate would need a per-family "project this group" hook. The authors' code covers LLaVA only.
* Refusing PaliGemma: its projector is one linear layer, so the Jacobian, and with it every token's sensitivity,
  is the same everywhere (the estimate equals the mean of ``||W u_k||`` for every token up to rounding); min-max
  normalising that rounding noise, as the authors' code would, weighs the diversity by chance. What is left is
  DivPrune's max-min diversity, which ``divprune`` offers.
* Seeded directions: the authors draw from torch's global RNG; here option ``seed`` seeds a fresh
  ``torch.Generator`` on the features' device for every image, so a selection does not depend on the other images
  of the batch or on earlier forwards (the same seed gives the same directions on one device type; CPU and CUDA
  streams differ). Directions are drawn in float32 and normalised there, then cast to the features' dtype.
* The projector runs in the model's dtype, as in the authors' fp16 runs. A step of 0.01 along a unit direction moves
  each coordinate by ~0.01 / sqrt(D), below half-precision resolution for coordinates of order 1, so the estimate is
  coarse there. Measured on a LLaVA-1.5-sized MLP (1024 -> 4096 -> 4096, 576 random unit-scale features, 64
  directions) against float32 at the same step: float16 rank correlation 0.67 (top 64: 28 shared) at eps = 0.01,
  0.996 (63) at 0.1; bfloat16 0.31 (16) at 0.01, 0.75 (31) at 0.1, 0.997 (61) at 1.0. We keep the authors' 0.01;
  in half precision a larger ``eps`` follows float32 better. (A float32 estimate would need a float32 copy of the
  projector, which the core does not offer.)
* Batched projector passes are split into chunks of at most ``CHUNK_ROWS`` perturbed rows (the authors push all
  ``K * N`` rows at once: 184k rows of width 4096 on LLaVA-NeXT), which bounds memory and changes no value.
* LLaVA-NeXT: per view, as the authors' ``select_tokens_sads_multi_frames`` (each view's own normalisation,
  distances and budget); the newline tokens are kept as structure, as they keep them. The NeXT file calls a
  low-rank approximation of the projector (``get_lowrank_mm_projector``, not defined in the released code); we use
  the projector itself, as the LLaVA-1.5 file does.
* LLaVA-OneVision videos: the model pools projected frame tokens 2x2, so their pre-projector features are the
  pooled tower rows (as the adapter gives them) and the estimate is the projector's sensitivity at that point.
  An any-resolution grid that LLaVA-OneVision shrinks by interpolation (larger than ``anyres_max_9``) has no
  per-token pre-projector features: such an image raises a ValueError.
* DivPrune's ``max_min_diverse`` is not reused as is: its first pick (largest nearest-neighbour distance) and its
  unweighted argmax are built in; the weighted greedy below follows the same vectorised running-minimum form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.greedy import greedy_max_min
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# the authors' run_zoo_prune.sh: NOISERECOV_NUM=64, NOISERECOV_INTENS=0.01
AUTHORS_DIRECTIONS = 64
AUTHORS_EPS = 0.01
# families whose per-token projector is a single linear map (a constant Jacobian: nothing to rank)
LINEAR_PROJECTORS = ("paligemma",)
# perturbed rows sent through the projector at once (ours: bounds memory, the sum is the same)
CHUNK_ROWS = 16384


def random_directions(count: int, dim: int, seed: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``count`` directions ``u ~ N(0, I)`` scaled to unit L2 norm, ``[count, dim]``, from a generator seeded with
    ``seed`` on ``device`` (drawn and normalised in float32, returned in ``dtype``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(count, dim, generator=generator, device=device, dtype=torch.float32)
    return (u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(dtype)


def zeroth_order_sensitivity(
    features: Tensor, project: Callable[[Tensor], Tensor], directions: Tensor, eps: float
) -> Tensor:
    """Per row of ``features [n, D]``: the mean over ``directions [K, D]`` of ``||P(x + eps u) - P(x - eps u)|| /
    (2 eps)``, ``[n]`` in float32. Forward passes of ``project`` only, batched over rows and directions."""
    n = features.shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=features.device)
    if n == 0:
        return total
    directions = directions.to(device=features.device, dtype=features.dtype)
    step = max(1, CHUNK_ROWS // n)  # directions per projector call
    with torch.no_grad():
        for start in range(0, directions.shape[0], step):
            shift = eps * directions[start : start + step, None, :]  # [k, 1, D], the same u for every token
            plus = project((features[None] + shift).flatten(0, 1))
            minus = project((features[None] - shift).flatten(0, 1))
            difference = (plus.float() - minus.float()).view(shift.shape[0], n, -1)
            total += difference.norm(dim=-1).sum(0) / (2 * eps)
    return total / directions.shape[0]


def sensitive_diverse(features: Tensor, sensitivity: Tensor, count: int) -> Tensor:
    """Greedy sensitivity-weighted max-min diversity (the authors' SADS) of ``count`` rows, in pick order: weights =
    min-max normalised ``sensitivity``; the first pick is the most sensitive row, then the row maximising weight x
    its smallest cosine distance to the picked ones (``features [n, H]``: the projected tokens)."""
    n = features.shape[0]
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    s = sensitivity.float()
    low, high = s.min(), s.max()
    weight = (s - low) / (high - low + 1e-8) if bool(high > low) else torch.ones_like(s)
    x = F.normalize(features.float(), dim=-1)
    distance = 1 - x @ x.T
    return greedy_max_min(distance, weight.argmax(), count, lambda closest: closest * weight)


@register_method
@dataclass
class ZooPrune(Method):
    """Keep each view's tokens that are most sensitive through the projector (zeroth-order estimate) and mutually
    diverse (greedy sensitivity x min cosine distance), before the LLM."""

    name = "zoo_prune"
    summary = "zeroth-order projector sensitivity x max-min cosine diversity, greedy"
    paper = "Kim et al., CVPR 2026 / arXiv 2509.24837 (AIM-SKKU/ZOO-Prune)"

    directions: int = AUTHORS_DIRECTIONS
    eps: float = AUTHORS_EPS
    seed: int = 0
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise ValueError(f"{self.name}: directions must be a positive int, got {self.directions!r}")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not math.isfinite(self.eps)
            or self.eps <= 0
        ):
            raise ValueError(f"{self.name}: eps must be a finite number > 0, got {self.eps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"{self.name}: seed must be an int in [0, 2**63), got {self.seed!r}")

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if not model.per_token_projector:
            raise ValueError(
                f"{self.name} perturbs each visual token's own input to the projector, but "
                f"{model.family_name or model.family}'s projector combines several patches into one token; it applies "
                "to families with a per-token MLP projector (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision)"
            )
        if model.family in LINEAR_PROJECTORS:
            raise ValueError(
                f"{self.name}: {model.family_name or model.family}'s projector is one linear layer, whose Jacobian is "
                "the same at every token, so every token's sensitivity is equal and the estimate would rank float "
                "rounding noise; what remains is max-min diversity: use divprune"
            )
        return [Stage(layer=None, per_crop=True, encoder_features=True)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        return [self._select_item(ctx, view) for view in ctx.items]

    def _select_item(self, ctx: PruneContext, view: ItemView) -> Tensor:
        groups = view.budget_groups()
        if all(budget >= members.numel() for members, budget in groups):
            return torch.cat([members for members, _ in groups])  # nothing to prune: no projector passes
        if view.encoder_features is None:
            raise ValueError(
                f"{self.name}: image {view.item.index} has no per-token features before the projector (an "
                f"any-resolution grid that {ctx.model.family_name or ctx.model.family} shrinks by interpolation "
                "blends several patches per token), so its sensitivity cannot be estimated; use smaller images or "
                "another method"
            )
        selectable = view.selectable.nonzero().squeeze(1)
        encoder = view.encoder_features[selectable]
        directions = random_directions(self.directions, encoder.shape[-1], self.seed, encoder.device, encoder.dtype)
        sensitivity = torch.zeros(view.num_tokens, dtype=torch.float32, device=encoder.device)
        sensitivity[selectable] = zeroth_order_sensitivity(encoder, ctx.project, directions, self.eps)
        chosen = []
        for members, budget in groups:  # each view on its own, as the authors' multi-frame selection
            picked = sensitive_diverse(view.features[members], sensitivity[members], budget)
            chosen.append(members[picked])
        return torch.cat(chosen)
