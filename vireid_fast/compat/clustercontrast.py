"""cluster-contrast drop-ins (``clustercontrast.utils.faiss_rerank``): replace one import line.

    from vireid_fast.compat.clustercontrast import compute_jaccard_distance

Same signature and return type as the community function; no faiss needed.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..ops.dbscan import dbscan
from ..ops.jaccard import kreciprocal_jaccard
from ._cluster_memory import ClusterMemory
from ._jaccard import as_features, timed_jaccard

__all__ = ["ClusterMemory", "cluster", "compute_jaccard_distance", "compute_jaccard_distance_sparse"]


def _as_features(target_features) -> torch.Tensor:
    return as_features(target_features)


def compute_jaccard_distance(target_features, k1: int = 20, k2: int = 6, print_flag: bool = True,
                             search_option: int = 0, use_float16: bool = False) -> np.ndarray:
    """k-reciprocal Jaccard distance, as cluster-contrast's ``compute_jaccard_distance``.

    Args:
        target_features: (N, d) features (torch tensor on any device, or numpy); the seeds pass L2-normalised ones.
            Neighbours are ranked by exact squared L2 distance like the community's faiss ``IndexFlatL2``, so
            un-normalised features give the community's result too.
        k1, k2: as the community function (callers use k1=30, k2=6); N >= k1 (N < k1 raises ValueError: the
            community result is built from faiss's -1 padding there).
        print_flag: print the two progress lines as the community function does.
        search_option: accepted for compatibility and ignored: it only chose where faiss ran; our kNN is exact.
        use_float16: return float16 (computed in float32, then cast; the community accumulates in float16).
    Returns:
        (N, N) numpy array, float32 (float16 with ``use_float16``).
    """
    del search_option  # where the faiss search ran; the result is the same
    return timed_jaccard(target_features, k1, k2, print_flag, use_float16)


def compute_jaccard_distance_sparse(target_features, k1: int = 20, k2: int = 6, print_flag: bool = True,
                                    search_option: int = 0, use_float16: bool = False):
    """Same as :func:`compute_jaccard_distance` as a ``scipy.sparse.csr_matrix`` holding only entries < 1.

    Entries not stored are 1.0 (not 0 as scipy's convention would suggest): use :func:`cluster` or
    :func:`vireid_fast.ops.dbscan` on it, or ``sparse_to_dense`` semantics with fill 1.0.
    """
    import scipy.sparse

    del search_option
    start = time.time()
    if print_flag:
        print("Computing jaccard distance (sparse)...")
    csr = kreciprocal_jaccard(_as_features(target_features), k1, k2, sparse=True, metric="l2")
    values = csr.values().numpy()
    if use_float16:
        values = values.astype(np.float16)
    n = csr.shape[0]
    out = scipy.sparse.csr_matrix((values, csr.col_indices().numpy(), csr.crow_indices().numpy()), shape=(n, n))
    if print_flag:
        print(f"Jaccard distance computing time cost: {time.time() - start}")
    return out


def cluster(features, eps: float = 0.6, min_samples: int = 4, k1: int = 30, k2: int = 6) -> np.ndarray:
    """Jaccard distance + DBSCAN in one call, as the seeds do every epoch; no N x N matrix is formed.

    Returns:
        labels (N,) int64 numpy array, -1 = outlier; identical to
        ``DBSCAN(eps, min_samples=min_samples, metric='precomputed').fit_predict(compute_jaccard_distance(...))``.
    """
    csr = kreciprocal_jaccard(_as_features(features), k1, k2, sparse=True, metric="l2")
    return dbscan(csr, eps, min_samples).numpy()
