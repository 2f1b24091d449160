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
# Memory-bank contrastive learning (cluster-contrast ClusterMemory and its update modes; spec/cluster_memory.md)
# ---------------------------------------------------------------------------------------------------------------------

MEMORY_UPDATE_MODES = ("sequential", "hard", "mean", "none")


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    # torch.nn.functional.normalize(x, dim=1): x / max(||x||, 1e-12)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def memory_contrastive_ref(inputs: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor,
                           soft_targets: torch.Tensor | None, temp: float, momentum: float,
                           update: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the memory-bank contrastive loss (ClusterMemory.forward).

    Args:
        inputs: (B, D) float32/float64/bf16/fp16, un-normalised features.
        targets: (B,) int64 labels in [0, C).
        memory: (C, D) float32 (float64 with float64 inputs), L2-normalised rows.
        soft_targets: None, or (B, C) target distributions (replace the one-hot of ``targets`` in the loss).
        temp: temperature > 0.
        momentum, update: carried to the backward, which updates ``memory`` (see :func:`memory_update_ref`).
    Returns:
        loss () mean cross-entropy; logits (B, C) = normalize(inputs) @ memory^T / temp; lse (B,) row log-sum-exp of
        the logits. Loss and lse are in memory's dtype, logits too (they are what the backward needs).
    """
    x = _normalize_rows(inputs.to(memory.dtype))
    logits = x.mm(memory.t()) / temp
    lse = torch.logsumexp(logits, dim=1)
    if soft_targets is None:
        per_sample = lse - logits.gather(1, targets.view(-1, 1)).squeeze(1)
    else:
        per_sample = -(soft_targets.to(memory.dtype) * (logits - lse[:, None])).sum(1)
    return per_sample.mean(), logits, lse


def memory_update_ref(normalized: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, momentum: float,
                      update: str) -> None:
    """Literal per-sample memory update of cluster-contrast (in place on ``memory``).

    ``normalized``: (B, D) L2-normalised features in memory's dtype. Modes: "sequential" — for every sample in batch
    order ``m[y] = normalize(mu m[y] + (1 - mu) x)`` (repeated labels update repeatedly); "hard" (cm_hard) — per label
    present, the member with the smallest ``x . m[y]`` (first in batch order on ties) gives one such step; "mean" — one
    step towards the mean of the label's members; "none" — no update. Renormalisation divides by the plain norm, as the
    community code does.
    """
    if update == "none":
        return
    if update == "sequential":
        for x, y in zip(normalized, targets.tolist(), strict=True):
            memory[y] = memory[y] * momentum + (1.0 - momentum) * x
            memory[y] /= memory[y].norm()
        return
    members: dict[int, list[int]] = {}
    for i, y in enumerate(targets.tolist()):
        members.setdefault(y, []).append(i)
    for y, idx in members.items():
        if update == "hard":
            sims = [float(normalized[i].dot(memory[y])) for i in idx]
            chosen = normalized[idx[min(range(len(idx)), key=lambda k: sims[k])]]
        elif update == "mean":
            chosen = normalized[idx].mean(0)
        else:
            raise ValueError(f"update must be one of {MEMORY_UPDATE_MODES}, got {update!r}")
        memory[y] = memory[y] * momentum + (1.0 - momentum) * chosen
        memory[y] /= memory[y].norm()


def memory_contrastive_backward_ref(grad_loss: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                                    memory: torch.Tensor, soft_targets: torch.Tensor | None, logits: torch.Tensor,
                                    lse: torch.Tensor, temp: float, momentum: float, update: str) -> torch.Tensor:
    """Backward of the memory-bank contrastive loss, then the in-place memory update.

    The gradient w.r.t. the un-normalised ``inputs`` uses ``memory`` as it is when this runs (before this call's
    update), like the community's autograd Function; ``logits``/``lse`` are the forward's. Returns grad_inputs (B, D)
    in inputs' dtype. ``memory`` is then updated with :func:`memory_update_ref`.
    """
    batch = inputs.shape[0]
    probs = torch.exp(logits - lse[:, None])
    if soft_targets is None:
        target = torch.zeros_like(probs).scatter_(1, targets.view(-1, 1), 1.0)
        grad_logits = probs - target
    else:
        soft = soft_targets.to(probs.dtype)
        grad_logits = probs * soft.sum(1, keepdim=True) - soft
    grad_logits = grad_logits * (grad_loss.to(probs.dtype) / (batch * temp))
    grad_x = grad_logits.mm(memory)
    raw = inputs.to(memory.dtype)
    norm = raw.norm(dim=1, keepdim=True)
    x = raw / norm.clamp_min(1e-12)
    # d normalize(v) / dv applied to g: (g - x (x.g)) / ||v|| when ||v|| > eps, else g / eps (clamped norm).
    projected = (grad_x - x * (x * grad_x).sum(1, keepdim=True)) / norm.clamp_min(1e-12)
    grad_inputs = torch.where(norm > 1e-12, projected, grad_x / 1e-12)
    memory_update_ref(x, targets, memory, momentum, update)
    return grad_inputs.to(inputs.dtype)


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
