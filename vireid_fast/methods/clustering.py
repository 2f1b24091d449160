"""Pseudo-labels from features: the per-epoch clustering every seed method starts from.

:func:`jaccard_dbscan` is the community step (k-reciprocal Jaccard distance, then DBSCAN), run on the project's ops
with a sparse distance (never an N x N matrix). Methods call it from :meth:`Method.pseudo_label` per modality, on both
modalities together (PCLHD's modality-invariant Jaccard via ``modality=``) or on concatenated features (HIL).
"""

from __future__ import annotations

import torch

from ..ops import dbscan, kreciprocal_jaccard


def jaccard_dbscan(features: torch.Tensor, *, k1: int, k2: int, eps: float, min_samples: int,
                   modality: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) int64 pseudo-labels on the CPU, -1 = outlier, clusters numbered 0..C-1 in DBSCAN's order.

    features: (N, D) float, L2-normalised; k1/k2: the Jaccard neighbourhood sizes (clipped to N - 1 and k1 for small
    N); eps/min_samples: DBSCAN on the Jaccard distance; modality: optional (N,) 0/1 tensor for the
    modality-invariant query expansion. N <= 1 gives all outliers.
    """
    n = features.shape[0]
    if n <= 1:
        return torch.full((n,), -1, dtype=torch.int64)
    k1 = min(k1, n - 1)
    dist = kreciprocal_jaccard(features, k1=k1, k2=min(k2, k1), sparse=True, modality=modality)
    return dbscan(dist, eps, min_samples).cpu()


def count_clusters(labels: torch.Tensor) -> int:
    """Distinct labels >= 0 (a joint label space need not use every number below its maximum)."""
    valid = labels[labels >= 0]
    return int(torch.unique(valid).numel()) if valid.numel() else 0


__all__ = ["count_clusters", "jaccard_dbscan"]
