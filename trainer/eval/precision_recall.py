"""Improved precision and recall (Kynkaanniemi et al., 2019) in a feature space.

Each set's manifold is the union of balls around its points, a point's radius being the distance
to its k-th nearest neighbour within the same set (itself excluded). Precision is the fraction of
generated points inside the real manifold (quality); recall is the fraction of real points inside
the generated manifold (coverage).
"""
from __future__ import annotations

import numpy as np
import torch

_CHUNK = 1024  # rows of the distance matrix computed at a time (memory bound)


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``features`` [n, d] to its k-th nearest other row -> [n]."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k: need 1 <= k < number of points ({n}), got {k}")
    radii = torch.empty(n, dtype=features.dtype)
    for start in range(0, n, _CHUNK):
        d = _pairwise_distances(features[start:start + _CHUNK], features)
        # position 0 of the sorted row is the point itself (distance 0), so index k is the k-th neighbour
        radii[start:start + _CHUNK] = d.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of ``queries`` within radius of at least one manifold point."""
    inside = 0
    for start in range(0, queries.shape[0], _CHUNK):
        d = _pairwise_distances(queries[start:start + _CHUNK], manifold)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> dict[str, float]:
    """Features [n_real, d] and [n_fake, d] -> {"precision": float, "recall": float}, each in [0, 1]."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features: need [n_real, d] and [n_fake, d], got {tuple(real.shape)} and {tuple(fake.shape)}")
    precision = _coverage(real, knn_radii(real, k), fake)
    recall = _coverage(fake, knn_radii(fake, k), real)
    return {"precision": precision, "recall": recall}
