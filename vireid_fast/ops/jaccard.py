"""k-reciprocal Jaccard distance, the community's ``compute_jaccard_distance`` (spec: shared/spec/jaccard.md).

Dense output equals the community's (N, N) float32 array; sparse output is a :class:`SparseDistance` holding only the
entries < 1 and the fill 1.0 of all others, computed without any N x N allocation.
"""

from __future__ import annotations

import torch

from . import _registry
from ._checks import check_kreciprocal_jaccard, finite
from ._validation import FLOAT_DTYPES, check_int, check_tensor
from .knn import knn
from .reference import kreciprocal_jaccard_ref
from .sparse import SparseDistance, csr_to_dense

__all__ = ["SparseDistance", "csr_to_dense", "kreciprocal_jaccard", "kreciprocal_jaccard_ref"]


def _jaccard_fake(features, initial_rank, rank_sim, k2, modality):
    n = features.shape[0]
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (features.new_empty((n + 1,), dtype=torch.int64), features.new_empty((nnz,), dtype=torch.int64),
            features.new_empty((nnz,)))


_registry.register("kreciprocal_jaccard", reference=kreciprocal_jaccard_ref, fake=_jaccard_fake,
                   check=check_kreciprocal_jaccard, needs_triton=False)


def kreciprocal_jaccard(features: torch.Tensor, k1: int = 30, k2: int = 6, *, sparse: bool = False,
                        modality: torch.Tensor | None = None, precision: str = "auto",
                        metric: str = "ip") -> torch.Tensor:
    """k-reciprocal Jaccard distance between all rows of ``features``.

    Args:
        features: (N, d) float32 (other float dtypes are cast), L2-normalised as the community code expects.
        k1: k-reciprocal neighbourhood size, 1 <= k1 < N (callers use 20, 30, 40).
        k2: query-expansion size, 1 <= k2 <= k1 (1 = none).
        sparse: return a :class:`~vireid_fast.ops.sparse.SparseDistance` holding only the entries < 1 and
            ``fill=1.0`` for all others, instead of the dense (N, N) float32 tensor. Its ``to_dense()`` fills 1.0 (a
            torch sparse CSR tensor would fill 0, "identical"), and :func:`vireid_fast.ops.dbscan` takes it as is.
        modality: optional (N,) integer tensor of 0/1 (visible/infrared): PCLHD's modality-invariant query expansion
            (the mean of each modality's rows among R[i][:k2], then the mean of the modalities present).
        precision: the kNN candidate search (see :func:`vireid_fast.ops.knn`); the result does not depend on it.
        metric: the order of the k1 nearest neighbours R[i]: ``"ip"`` (largest inner product first, the spec's order
            for L2-normalised features) or ``"l2"`` (smallest squared Euclidean distance first, the order of the
            community's faiss ``IndexFlatL2``; it differs from "ip" when the rows' norms differ). The encoding weights
            are ``softmax(-(2 - 2 f_i.f_j))`` either way, as in the community code.
    Returns:
        (N, N) float32 dense tensor, or a :class:`SparseDistance` of that shape with float32 values and fill 1.0.
    """
    check_tensor("features", features, dims=(2,), dtypes=FLOAT_DTYPES)
    n = features.shape[0]
    check_int("k1", k1, 1)
    check_int("k2", k2, 1)
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if k1 >= n:
        raise ValueError(f"k1={k1} must be smaller than the number of features N={n}; pass k1 <= {n - 1}")
    if k2 > k1:
        raise ValueError(f"k2={k2} must be <= k1={k1}")
    feats = features.float().contiguous()
    finite("features", feats)  # before the kNN, which would blame its argument x
    mod = None
    if modality is not None:
        check_tensor("modality", modality, dims=(1,))
        if modality.shape[0] != n or modality.dtype.is_floating_point or modality.dtype == torch.bool:
            raise ValueError(f"modality must be an (N,)={n} integer tensor of 0/1, got {tuple(modality.shape)} "
                             f"{modality.dtype}")
        mod = modality.to(device=feats.device, dtype=torch.int64).contiguous()
    # Nearest by inner product (the spec's order for L2-normalised features); the products are reused in step 4.
    # By squared L2 the kNN values are distances, so the op recomputes the products itself (rank_sim=None).
    sim, rank = knn(feats, k1, metric=metric, precision=precision)
    if metric == "l2":
        sim = None
    backend = _registry.choose_backend("kreciprocal_jaccard", feats.device)
    crow, col, values = _registry.run("kreciprocal_jaccard", backend, feats.device, feats, rank, sim, k2, mod)
    if sparse:
        return SparseDistance(crow, col, values, n, fill=1.0)
    return csr_to_dense(crow, col, values, n)
