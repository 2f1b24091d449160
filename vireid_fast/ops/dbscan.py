"""DBSCAN on a precomputed distance (dense, or sparse with an explicit fill value), label for label as scikit-learn's
``DBSCAN(eps, min_samples, metric='precomputed')`` on the dense matrix.

A sparse distance must say what its entries not stored are: a :class:`~vireid_fast.ops.sparse.SparseDistance` (what
``kreciprocal_jaccard(..., sparse=True)`` returns) carries its fill; a plain ``torch.sparse_csr_tensor`` is ambiguous
(the Jaccard CSR means 1.0 = far, a dense distance's ``.to_sparse_csr()`` dropped its zeros = identical) and is refused
unless ``fill=`` is given.
"""

from __future__ import annotations

import torch

from . import _registry
from ._checks import check_dbscan_csr, check_dbscan_dense, check_dbscan_params, number
from ._validation import FLOAT_DTYPES, check_tensor
from .reference import dbscan_csr_ref, dbscan_dense_ref
from .sparse import SparseDistance

__all__ = ["dbscan", "dbscan_csr_ref", "dbscan_dense_ref"]


def _dense_fake(dist, eps, min_samples):
    return dist.new_empty((dist.shape[0],), dtype=torch.int64)


def _csr_fake(crow, col, values, eps, min_samples, fill):
    return crow.new_empty((crow.shape[0] - 1,), dtype=torch.int64)


_registry.register("dbscan_dense", reference=dbscan_dense_ref, fake=_dense_fake, check=check_dbscan_dense,
                   needs_triton=False)
_registry.register("dbscan_csr", reference=dbscan_csr_ref, fake=_csr_fake, check=check_dbscan_csr,
                   needs_triton=False)

_AMBIGUOUS = ("dist is a torch sparse CSR tensor, whose entries not stored have no agreed meaning: pass fill= (the "
              "distance they stand for). fill=1.0 for a Jaccard distance (better: pass kreciprocal_jaccard(..., "
              "sparse=True) itself, which carries its fill); fill=0.0 for a dense distance converted with "
              ".to_sparse_csr(), which dropped its zeros (or pass the dense tensor)")


def _run_csr(crow, col, values, n: int, eps: float, min_samples: int, fill: float, device) -> torch.Tensor:
    if crow.dim() != 1 or crow.numel() != n + 1:
        raise ValueError(f"dist's CSR crow must have N + 1 = {n + 1} entries for shape ({n}, {n}), got "
                         f"{tuple(crow.shape)}; build it with torch.sparse_csr_tensor from valid indices")
    crow = crow.to("cpu", torch.int64).contiguous()
    col = col.to("cpu", torch.int64).contiguous()
    values = values.cpu()
    if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    backend = _registry.choose_backend("dbscan_csr", torch.device("cpu"))
    return _registry.run("dbscan_csr", backend, torch.device("cpu"), crow, col, values.contiguous(), eps, min_samples,
                         fill)


def dbscan(dist, eps: float, min_samples: int, *, fill: float | None = None) -> torch.Tensor:
    """Cluster labels from a precomputed (N, N) distance; -1 marks noise.

    Args:
        dist: dense (N, N) float32/float64 tensor; or a :class:`~vireid_fast.ops.sparse.SparseDistance` (the sparse
            result of :func:`vireid_fast.ops.kreciprocal_jaccard`: stored entries plus the fill 1.0 of the others);
            or a ``torch.sparse_csr_tensor`` together with ``fill``.
        eps: neighbourhood radius (``dist <= eps``), a finite number > 0.
        min_samples: neighbourhood size (the point included) for a core point, >= 1.
        fill: the distance of the entries a sparse ``dist`` does not store. Required for a torch CSR tensor (there is
            no safe default: the Jaccard CSR means 1.0, a dense distance's ``.to_sparse_csr()`` means 0.0); for a
            ``SparseDistance`` it may be omitted and must match its own fill if given. Not NaN or -inf (+inf allowed).
    Returns:
        labels (N,) int64 on ``dist``'s device, numbered like scikit-learn: clusters in order of their
        smallest-index core point, border points in the lowest-numbered cluster reaching them.

    DBSCAN is a sequential graph traversal: inputs on an accelerator are clustered by the CPU kernel on a host copy.
    """
    eps = check_dbscan_params(eps, min_samples)
    if fill is not None:
        fill = number("fill", fill, allow_inf=True)  # +inf: never a neighbour; NaN and -inf are refused
    if isinstance(dist, SparseDistance):
        if fill is not None and fill != dist.fill:
            raise ValueError(f"fill={fill} contradicts dist.fill={dist.fill} (the value the SparseDistance's entries "
                             "not stored stand for); drop the fill argument")
        n = dist.shape[0]
        labels = _run_csr(dist.crow, dist.col, dist.vals, n, eps, min_samples, dist.fill, None)
        return labels.to(dist.device)
    if not isinstance(dist, torch.Tensor):
        raise TypeError(f"dist must be a torch.Tensor (dense, or sparse CSR with fill=) or a SparseDistance, got "
                        f"{type(dist).__name__}; wrap it with torch.as_tensor")
    device = dist.device
    if dist.layout == torch.sparse_csr:
        if fill is None:
            raise ValueError(_AMBIGUOUS)
        if dist.dim() != 2 or dist.shape[0] != dist.shape[1] or dist.shape[0] == 0:
            raise ValueError(f"dist must be a non-empty square (N, N) matrix, got shape {tuple(dist.shape)}")
        labels = _run_csr(dist.crow_indices(), dist.col_indices(), dist.values(), dist.shape[0], eps, min_samples,
                          fill, device)
    elif dist.layout == torch.strided:
        if fill is not None:
            raise ValueError(f"fill={fill} applies to sparse distances only; dist is dense: drop fill")
        check_tensor("dist", dist, dims=(2,), dtypes=FLOAT_DTYPES)
        if dist.shape[0] != dist.shape[1]:
            raise ValueError(f"dist must be square (N, N), got shape {tuple(dist.shape)}")
        host = dist.cpu()
        if host.dtype not in (torch.float32, torch.float64):
            host = host.float()
        backend = _registry.choose_backend("dbscan_dense", torch.device("cpu"))
        labels = _registry.run("dbscan_dense", backend, torch.device("cpu"), host.contiguous(), eps, min_samples)
    else:
        raise TypeError(f"dist must be dense or sparse CSR, got layout {dist.layout}; convert with .to_sparse_csr() "
                        "and pass fill=")
    return labels.to(device)
