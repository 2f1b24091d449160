"""DBSCAN on a precomputed distance (dense, or CSR with a fill value), label for label as scikit-learn's
``DBSCAN(eps, min_samples, metric='precomputed')`` on the dense matrix.
"""

from __future__ import annotations

import torch

from . import _registry
from ._validation import check_finite, check_int, check_positive, check_tensor
from .reference import dbscan_csr_ref, dbscan_dense_ref

__all__ = ["dbscan", "dbscan_csr_ref", "dbscan_dense_ref"]


def _dense_fake(dist, eps, min_samples):
    return dist.new_empty((dist.shape[0],), dtype=torch.int64)


def _csr_fake(crow, col, values, eps, min_samples, fill):
    return crow.new_empty((crow.shape[0] - 1,), dtype=torch.int64)


_registry.register("dbscan_dense", reference=dbscan_dense_ref, fake=_dense_fake, needs_triton=False)
_registry.register("dbscan_csr", reference=dbscan_csr_ref, fake=_csr_fake, needs_triton=False)


def dbscan(dist: torch.Tensor, eps: float, min_samples: int, *, fill: float = 1.0) -> torch.Tensor:
    """Cluster labels from a precomputed (N, N) distance; -1 marks noise.

    Args:
        dist: dense (N, N) float32/float64 tensor, or a ``torch.sparse_csr_tensor`` whose entries not stored equal
            ``fill`` (the sparse form of :func:`vireid_fast.ops.kreciprocal_jaccard`, fill 1.0).
        eps: neighbourhood radius (``dist <= eps``), > 0.
        min_samples: neighbourhood size (the point included) for a core point, >= 1.
        fill: value of the entries a CSR input does not store.
    Returns:
        labels (N,) int64 on ``dist``'s device, numbered like scikit-learn: clusters in order of their
        smallest-index core point, border points in the lowest-numbered cluster reaching them.

    DBSCAN is a sequential graph traversal: inputs on an accelerator are clustered by the CPU kernel on a host copy.
    """
    eps = check_positive("eps", eps)
    check_int("min_samples", min_samples, 1)
    if not isinstance(dist, torch.Tensor):
        raise TypeError(f"dist must be a torch.Tensor (dense or sparse CSR), got {type(dist).__name__}")
    device = dist.device
    if dist.layout == torch.sparse_csr:
        if dist.dim() != 2 or dist.shape[0] != dist.shape[1] or dist.shape[0] == 0:
            raise ValueError(f"dist must be a non-empty square (N, N) matrix, got shape {tuple(dist.shape)}")
        crow = dist.crow_indices().to("cpu", torch.int64).contiguous()
        col = dist.col_indices().to("cpu", torch.int64).contiguous()
        values = dist.values().cpu()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        check_finite("dist", values)
        backend = _registry.choose_backend("dbscan_csr", torch.device("cpu"))
        fn = dbscan_csr_ref if backend == "reference" else torch.ops.vireid.dbscan_csr
        labels = fn(crow, col, values.contiguous(), eps, min_samples, float(fill))
    elif dist.layout == torch.strided:
        check_tensor("dist", dist, dims=(2,))
        if dist.shape[0] != dist.shape[1]:
            raise ValueError(f"dist must be square (N, N), got shape {tuple(dist.shape)}")
        if not dist.is_floating_point():
            raise TypeError(f"dist must be a float tensor, got {dist.dtype}")
        host = dist.cpu()
        if host.dtype not in (torch.float32, torch.float64):
            host = host.float()
        check_finite("dist", host)
        backend = _registry.choose_backend("dbscan_dense", torch.device("cpu"))
        fn = dbscan_dense_ref if backend == "reference" else torch.ops.vireid.dbscan_dense
        labels = fn(host.contiguous(), eps, min_samples)
    else:
        raise TypeError(f"dist must be dense or sparse CSR, got layout {dist.layout}; convert with .to_sparse_csr()")
    return labels.to(device)
