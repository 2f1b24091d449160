"""The Jaccard step shared by the compat modules: the community's k-reciprocal Jaccard distance, ranked like faiss.

Every seed computes ``initial_rank`` with a faiss ``IndexFlatL2`` search of ``k1`` neighbours, i.e. by squared L2
distance, whatever the features' norms; the encoding weights are ``softmax(-(2 - 2 f_i.f_j))``. We rank by the exact
squared distance (float64 sums of the float32 products, ties to the lower index), so un-normalised features give the
community's result and near-ties follow the exact order instead of faiss's float32 rounding.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..ops.jaccard import csr_to_dense, kreciprocal_jaccard
from ..ops.knn import knn
from ..ops.reference import kreciprocal_jaccard_ref

__all__ = ["as_features", "jaccard_csr", "jaccard_dense", "timed_jaccard"]


def as_features(target_features, name: str = "target_features") -> torch.Tensor:
    """(N, d) float32 CPU tensor from a torch tensor (any device, detached) or a numpy array."""
    if isinstance(target_features, np.ndarray):
        target_features = torch.from_numpy(target_features)
    if not isinstance(target_features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(target_features).__name__}")
    if target_features.dim() != 2:
        raise ValueError(f"{name} must be (N, d), got shape {tuple(target_features.shape)}")
    return target_features.detach().float().cpu().contiguous()


def _check_k1(n: int, k1: int) -> None:
    if n < k1:
        raise ValueError(f"k1={k1} needs at least k1 features, got N={n}: faiss pads the k1-neighbour list with -1 "
                         "there and the community code reads -1 as the last row, so its result is meaningless; pass "
                         f"k1=min(k1, N) = {n}")


def jaccard_csr(features: torch.Tensor, k1: int, k2: int,
                modality: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR ``(crow, col, values)`` of the (N, N) distance (entries not stored are 1.0), ranked by squared L2.

    N > k1 runs the op; N == k1 (every row is everybody's neighbour, which the community code handles) runs the
    reference on the full L2 order; N < k1 raises ValueError (see :func:`_check_k1`).
    """
    n = features.shape[0]
    _check_k1(n, k1)
    if n > k1:
        csr = kreciprocal_jaccard(features, k1, k2, modality=modality, metric="l2", sparse=True)
        return csr.crow_indices(), csr.col_indices(), csr.values()
    if k2 > k1:
        raise ValueError(f"k2={k2} must be <= k1={k1}")
    _, rank = knn(features, k1, metric="l2")
    return kreciprocal_jaccard_ref(features, rank, None, k2, modality)


def jaccard_dense(features: torch.Tensor, k1: int, k2: int, modality: torch.Tensor | None = None,
                  use_float16: bool = False) -> np.ndarray:
    """The community's (N, N) numpy array: float32, or float16 with ``use_float16`` (computed in float32, cast)."""
    crow, col, values = jaccard_csr(features, k1, k2, modality)
    dist = csr_to_dense(crow, col, values, features.shape[0]).numpy()
    return dist.astype(np.float16) if use_float16 else dist


def timed_jaccard(target_features, k1: int, k2: int, print_flag: bool, use_float16: bool,
                  modality_of=None) -> np.ndarray:
    """The community functions' body: the two progress lines, then :func:`jaccard_dense`.

    ``modality_of(n)`` returns the (N,) 0/1 modality tensor for PCLHD's modality-invariant variant (or None).
    """
    start = time.time()
    if print_flag:
        print("Computing jaccard distance...")
    features = as_features(target_features)
    modality = None if modality_of is None else modality_of(features.shape[0])
    dist = jaccard_dense(features, k1, k2, modality, use_float16)
    if print_flag:
        print(f"Jaccard distance computing time cost: {time.time() - start}")
    return dist
