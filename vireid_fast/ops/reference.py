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
