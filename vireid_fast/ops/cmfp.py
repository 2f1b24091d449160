"""Cross-Modality Feature Propagation, CMFP (SALCR Sec. 3.5, Eq. 28-29), without dense (Nv+Nr)^2 matrices.

For the four similarity blocks ``Svv, Svr, Srv, Srr`` of L2-normalised features, each row keeps its entries ``>=``
the row's k-th largest value (ties can keep more than k), clamps negatives to 0 and is divided by its sum — each block
on its own. ``G = [[K(Svv), K(Svr)], [K(Srv), K(Srr)]]`` then propagates ``[Fv; Fr]`` and the rows are
L2-normalised.

Defined result where the reference produces NaN: a block row whose kept entries are all ``<= 0`` (possible in the
cross-modality blocks) contributes nothing, so that row propagates from its other block only; a row with no positive
kept entry in either block becomes the zero vector.

The C++ kernel takes each block's neighbours from the exact kNN search (:func:`vireid_fast.ops.knn`'s C++ code: scores
are float32 roundings of exact dot products, every tie at the threshold kept) and returns ``G`` in CSR form; memory is
O((Nv+Nr)·(d + k)) plus one score tile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _registry
from ._checks import check_cmfp
from ._validation import FLOAT_DTYPES, check_same_device, check_same_width, check_tensor
from .reference import cmfp_ref

__all__ = ["CMFPResult", "cmfp", "cmfp_ref", "cmfp_rerank"]


class CMFPResult(NamedTuple):
    """``prop_v`` (Nv, d), ``prop_r`` (Nr, d); ``affinity``: G as a torch sparse CSR (Nv+Nr, Nv+Nr) tensor or None."""

    prop_v: torch.Tensor
    prop_r: torch.Tensor
    affinity: torch.Tensor | None


def _cmfp_fake(features_v, features_r, k):
    n = features_v.shape[0] + features_r.shape[0]
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (torch.empty_like(features_v), torch.empty_like(features_r),
            features_v.new_empty((n + 1,), dtype=torch.int64), features_v.new_empty((nnz,), dtype=torch.int64),
            features_v.new_empty((nnz,)))


_registry.register("cmfp", reference=cmfp_ref, fake=_cmfp_fake, check=check_cmfp)


def _check(features_v, features_r, k):
    check_tensor("features_v", features_v, dims=(2,), dtypes=FLOAT_DTYPES)
    check_tensor("features_r", features_r, dims=(2,), dtypes=FLOAT_DTYPES)
    check_same_width("features_v", features_v, "features_r", features_r)
    check_same_device(features_v=features_v, features_r=features_r)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    limit = min(features_v.shape[0], features_r.shape[0])
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, min(N_v, N_r)] = [1, {limit}] (neighbours kept per row and block), got "
                         f"{k}; lower k or pass more features")


def _run(fv: torch.Tensor, fr: torch.Tensor, k: int):
    return _registry.run("cmfp", _registry.choose_backend("cmfp", fv.device), fv.device, fv, fr, k)


def cmfp(features_v: torch.Tensor, features_r: torch.Tensor, k: int, *,
         return_affinity: bool = False) -> CMFPResult:
    """Propagate features across modalities with the k-NN affinity of SALCR's CMFP.

    Args:
        features_v: (Nv, d) float32/float64 visible (or query) features, L2-normalised in the seeds; bf16/fp16 are
            computed in float32.
        features_r: (Nr, d) infrared (or gallery) features, same dtype and d.
        k: neighbours kept per row in each block, 1 <= k <= min(Nv, Nr) (SALCR: 30 on SYSU-MM01, 8 on RegDB).
        return_affinity: also return G as a sparse CSR tensor (positive weights only; each row's visible part and
            infrared part each sum to 1, or 0 where the block row had no positive kept similarity).
    Returns:
        :class:`CMFPResult` ``(prop_v, prop_r, affinity)`` with L2-normalised rows in the input dtype.
    """
    _check(features_v, features_r, k)
    dtype = features_v.dtype
    fv, fr = features_v, features_r.to(dtype)
    if dtype not in (torch.float32, torch.float64):
        fv, fr = fv.float(), fr.float()
    prop_v, prop_r, crow, col, val = _run(fv.contiguous(), fr.contiguous(), k)
    affinity = None
    if return_affinity:
        n = fv.shape[0] + fr.shape[0]
        affinity = torch.sparse_csr_tensor(crow, col, val, (n, n), check_invariants=False)
    return CMFPResult(prop_v.to(dtype), prop_r.to(dtype), affinity)


def cmfp_rerank(q_feats: torch.Tensor, g_feats: torch.Tensor, k: int) -> torch.Tensor:
    """SALCR's CMFP(te): propagate [query; gallery] (each set one "modality"), then squared Euclidean distances.

    Args:
        q_feats: (Nq, d), g_feats: (Ng, d) float features (L2-normalised test features).
        k: neighbours per row and block (SALCR: 30 SYSU-MM01, 8 RegDB); 1 <= k <= min(Nq, Ng).
    Returns:
        (Nq, Ng) distance matrix (float32, or float64 for float64 inputs), ready for :func:`vireid_fast.eval.evaluate`.
    """
    prop_q, prop_g, _ = cmfp(q_feats, g_feats, k)
    dtype = torch.float64 if prop_q.dtype == torch.float64 else torch.float32
    q, g = prop_q.to(dtype), prop_g.to(dtype)
    dist = (q * q).sum(1, keepdim=True) + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    return dist.clamp_min_(0.0)
