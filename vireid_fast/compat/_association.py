"""Association helpers shared by the MULT and SALCR drop-ins (their ``cross_association.py``)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ._jaccard import as_features, jaccard_csr

__all__ = ["generate_center", "generate_one_hot_label", "pairwise_distance", "rerank_jaccard", "sinkhorn_solver"]


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, N) squared distances ``||x||^2 + ||y||^2 - 2 x.y`` between the rows of x (M, ...) and y (N, ...)."""
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    return torch.addmm((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :], x, y.t(), beta=1, alpha=-2)


def generate_one_hot_label(labels, num_cls: int) -> torch.Tensor:
    """(N, num_cls) float32 CPU one-hot rows of the integer ``labels`` (N,)."""
    labels = torch.as_tensor(labels).cpu().to(torch.int64)
    out = torch.zeros(labels.shape[0], num_cls)
    out[torch.arange(labels.shape[0]), labels] = 1
    return out


def generate_center(pseudo_labels, features: torch.Tensor) -> torch.Tensor:
    """(K, D) mean feature of each label in sorted order, label -1 (outliers) skipped; prints the outlier count."""
    labels = torch.as_tensor(np.asarray(pseudo_labels) if not isinstance(pseudo_labels, torch.Tensor)
                             else pseudo_labels).to(device=features.device, dtype=torch.int64)
    keep = labels != -1
    print(f"----number of outliers: {int((~keep).sum()):5d}")
    uniq, inverse = torch.unique(labels[keep], return_inverse=True)
    sums = torch.zeros(uniq.numel(), features.shape[1], dtype=features.dtype,
                       device=features.device).index_add_(0, inverse, features[keep])
    return sums / torch.bincount(inverse, minlength=uniq.numel()).to(sums)[:, None]


def sinkhorn_solver(P: torch.Tensor, lambda_sk: float = 25, max_iter: int = 500) -> torch.Tensor:  # noqa: N803
    """The seeds' Sinkhorn-Knopp on ``exp(-lambda_sk P)`` with uniform marginals (1/K rows, 1/N columns).

    It stops as the community solver does — when the relative change of the column scaling, measured every 10th
    step, is <= 0.1, or after ``max_iter`` steps — so the returned plan is the community's (its argmax is what the
    seeds use); :func:`vireid_fast.ops.sinkhorn` gives the converged plan instead.

    Args:
        P: (K, N) cost (squared distances in the seeds), float32. lambda_sk: MULT passes 25, SALCR 5.
    Returns:
        (K, N) plan ``diag(alpha) exp(-lambda P) diag(beta)`` in P's dtype.
    """
    start = time.time()
    rows, cols = P.shape
    kernel = torch.exp(-lambda_sk * P)
    beta = torch.full((cols, 1), 1.0 / cols, dtype=P.dtype, device=P.device)
    alpha = torch.full((rows, 1), 1.0 / rows, dtype=P.dtype, device=P.device)
    err, step = 1e6, 0
    while err > 1e-1 and step < max_iter:
        alpha = (1.0 / rows) / kernel.mm(beta)
        beta_new = (1.0 / cols) / alpha.t().mm(kernel).t()
        if step % 10 == 0:
            err = float(np.nansum(np.abs((beta / beta_new - 1).cpu().numpy())))
        beta = beta_new
        step += 1
    print(f"Sinkhorn-Knopp   Error: {err:.3f}   Total step: {step}   Total time: {time.time() - start:.3f}")
    return alpha * kernel * beta.t()


def rerank_jaccard(centers_RGB, centers_IR, k1: int = 40, k2: int = 6, use_float16: bool = False):  # noqa: N803
    """(N_ir, N_rgb) numpy float32 block of the Jaccard distance over ``[centers_IR; centers_RGB]``: rows the
    infrared centres, columns the visible ones. ``use_float16`` is accepted and ignored, as in the community code.

    Computed from the sparse distance (no (N, N) matrix), printing the progress lines as the community call does.
    """
    del use_float16
    start = time.time()
    print("Computing jaccard distance...")
    rgb, ir = as_features(centers_RGB, "centers_RGB"), as_features(centers_IR, "centers_IR")
    n_ir, n_rgb = ir.shape[0], rgb.shape[0]
    crow, col, values = jaccard_csr(torch.cat((ir, rgb), 0), k1, k2)
    end = int(crow[n_ir])  # the CSR entries of the infrared rows
    rows = torch.repeat_interleave(torch.arange(n_ir), crow[:n_ir + 1].diff())
    keep = col[:end] >= n_ir
    out = np.ones((n_ir, n_rgb), dtype=np.float32)
    out[rows[keep].numpy(), (col[:end][keep] - n_ir).numpy()] = values[:end][keep].numpy()
    print(f"Jaccard distance computing time cost: {time.time() - start}")
    return out
