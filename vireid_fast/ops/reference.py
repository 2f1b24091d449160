"""Pure-PyTorch references of every vireid op: readable, float64 where precision matters, and the test oracle.

Each ``*_ref`` function takes exactly the arguments of its op's schema (see ``csrc/schemas.cpp``) and is also the
kernel used on devices without a dedicated one. Semantics follow ``shared/spec`` (the community code).
"""

from __future__ import annotations

import torch


def sinkhorn_ref(cost: torch.Tensor, lam: float, a: torch.Tensor, b: torch.Tensor, max_iter: int,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn for ``min <P, C> - H(P)/lam`` s.t. ``P 1 = a``, ``P^T 1 = b``.

    Args:
        cost: (B, N, K) float32/float64.
        a: (B, N) float64, b: (B, K) float64, positive with equal sums.
    Returns:
        plan (B, N, K) in cost's dtype, n_iter (B,) int64, err (B,) float64.

    Iteration (shared by every backend): start with g = 0 and f = log a - LSE_j(g - lam C); then repeat
    ``g = log b - LSE_i(f - lam C)`` (columns now exact), measure ``err = sum_i |P 1 - a|``, stop if err <= tol or
    at max_iter, else ``f = log a - LSE_j(g - lam C)``. The plan is ``exp(f_i + g_j - lam C_ij)`` at the stop.
    """
    batch = cost.shape[0]
    plans, iters, errs = [], [], []
    for k in range(batch):
        neg = -lam * cost[k].double()
        log_a, log_b = a[k].log(), b[k].log()
        g = torch.zeros(cost.shape[2], dtype=torch.float64, device=cost.device)
        f = log_a - torch.logsumexp(neg + g[None, :], dim=1)
        it, err = 0, float("inf")
        while it < max_iter:
            it += 1
            g = log_b - torch.logsumexp(neg + f[:, None], dim=0)
            lse_rows = torch.logsumexp(neg + g[None, :], dim=1)
            err = float((torch.exp(f + lse_rows) - a[k]).abs().sum())
            if err <= tol or it == max_iter:
                break
            f = log_a - lse_rows
        plans.append(torch.exp(f[:, None] + g[None, :] + neg).to(cost.dtype))
        iters.append(it)
        errs.append(err)
    return (torch.stack(plans), torch.tensor(iters, dtype=torch.int64, device=cost.device),
            torch.tensor(errs, dtype=torch.float64, device=cost.device))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation area: Cross-Modality Feature Propagation (SALCR Eq. 28-29)
# ---------------------------------------------------------------------------------------------------------------------


def _cmfp_block_ref(sim: torch.Tensor, k: int) -> torch.Tensor:
    """K(S, k) row-normalised: keep entries >= the row's k-th largest value, clamp at 0, divide by the row sum.

    A row whose kept entries are all <= 0 becomes all zeros (the community code divides 0 by 0 there).
    """
    kth = torch.topk(sim, k, dim=1).values[:, k - 1:k]
    kept = torch.where(sim >= kth, sim, torch.zeros_like(sim)).clamp_min(0)
    total = kept.sum(dim=1, keepdim=True)
    return torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(kept))


def cmfp_ref(features_v: torch.Tensor, features_r: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense four-block CMFP, as SALCR computes it (O((Nv+Nr)^2) memory: the oracle for small inputs only).

    Args:
        features_v: (Nv, d), features_r: (Nr, d) float32/float64 (the seeds pass L2-normalised features).
        k: neighbours kept per row and block, 1 <= k <= min(Nv, Nr).
    Returns:
        prop_v (Nv, d), prop_r (Nr, d): rows of ``normalize(G @ [Fv; Fr])``; and G = [[K(Svv), K(Svr)], [K(Srv),
        K(Srr)]] in CSR form: crow (Nv+Nr+1,) int64, col (nnz,) int64, val (nnz,) in the features' dtype (the
        positive entries, columns sorted).
    """
    nv = features_v.shape[0]
    feats = torch.cat([features_v, features_r])
    g = torch.cat([
        torch.cat([_cmfp_block_ref(features_v @ features_v.T, k), _cmfp_block_ref(features_v @ features_r.T, k)], 1),
        torch.cat([_cmfp_block_ref(features_r @ features_v.T, k), _cmfp_block_ref(features_r @ features_r.T, k)], 1),
    ])
    prop = torch.nn.functional.normalize(g @ feats, dim=1)
    rows, cols = torch.nonzero(g, as_tuple=True)
    crow = torch.zeros(g.shape[0] + 1, dtype=torch.int64, device=g.device)
    crow[1:] = torch.bincount(rows, minlength=g.shape[0]).cumsum(0)
    return prop[:nv].contiguous(), prop[nv:].contiguous(), crow, cols, g[rows, cols]
