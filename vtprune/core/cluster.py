"""Density-peak clustering with k-nearest-neighbour density (DPC-kNN), shared by the video merging methods.

FastVID, HoliTom and PruneVid all pick merge centres the way TCFormer's ``cluster_dpc_knn`` does (Zeng et al., CVPR
2022; Rodriguez & Laio, Science 2014): distances scaled by ``1 / sqrt(D)``, a token's density is
``exp(-mean squared distance to its k nearest tokens)`` (itself included, at distance 0), its ``delta`` is the
distance to the nearest denser token (the largest distance of all for the densest), and centres are the top
``density * delta``. Every other token joins its nearest centre.

Choice that is ours: the references break density ties with ``1e-6 * rand`` noise, so their centres depend on the
RNG; here a tie goes to the earlier token (exactly, with no noise), so a selection is a function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DensityPeaks:
    """Per token of ``x [N, D]``: ``density``, ``delta`` (distance to the nearest denser token) and ``score``
    (``density * delta``, higher = better centre), with the scaled pairwise ``distance [N, N]``."""

    density: Tensor
    delta: Tensor
    score: Tensor
    distance: Tensor


def density_peaks(x: Tensor, k: int) -> DensityPeaks:
    """DPC-kNN quantities of the rows of ``x [N, D]`` (float32 inside); ``k`` neighbours, itself included, capped
    at ``N``."""
    if x.dim() != 2 or x.size(0) == 0:
        raise ValueError(f"density_peaks needs x of shape [N > 0, D], got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"density_peaks: k must be >= 1, got {k}")
    x = x.float()
    count = x.size(0)
    distance = torch.cdist(x, x) / math.sqrt(x.size(1))
    nearest = distance.topk(min(k, count), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    order = torch.arange(count, device=x.device)
    # j is denser than i: higher density, or equal density and earlier (our exact tie-break)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (order[None, :] < order[:, None])
    )
    delta = torch.where(denser, distance, distance.max()).min(dim=-1).values
    return DensityPeaks(density=density, delta=delta, score=density * delta, distance=distance)


def density_peak_centers(x: Tensor, count: int, k: int) -> Tensor:
    """Indices of the ``count`` best DPC-kNN centres among the rows of ``x`` (best first; ``count`` capped at
    ``N``)."""
    peaks = density_peaks(x, k)
    return peaks.score.topk(min(count, x.size(0))).indices


def nearest_center(x: Tensor, centers: Tensor, metric: str = "euclidean") -> Tensor:
    """For each row of ``x [N, D]``, the position in ``centers`` (row indices of ``x``) of its nearest centre; a
    centre belongs to itself. ``metric``: "euclidean" (PruneVid, HoliTom) or "cosine" (FastVID's assignment)."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"nearest_center: metric must be 'euclidean' or 'cosine', got {metric!r}")
    x = x.float()
    if metric == "euclidean":
        assignment = torch.cdist(x, x[centers]).argmin(dim=-1)
    else:
        unit = torch.nn.functional.normalize(x, dim=-1)
        assignment = (unit @ unit[centers].T).argmax(dim=-1)
    assignment[centers] = torch.arange(centers.numel(), device=x.device)
    return assignment
