"""Pure-PyTorch references of every vireid op: readable, float64 where precision matters, and the test oracle.

Each ``*_ref`` function takes exactly the arguments of its op's schema (see ``csrc/schemas.cpp``) and is also the
kernel used on devices without a dedicated one. Semantics follow ``shared/spec`` (the community code).
"""

from __future__ import annotations

import math

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
    Computed with each row of C shifted by its minimum (exactly the same iterates, f shifted by the row's lam min C).
    """
    batch = cost.shape[0]
    plans, iters, errs = [], [], []
    for k in range(batch):
        # Each cost row shifted by its minimum: the plan is unchanged (f absorbs the shift exactly, iterate for
        # iterate), and the potentials stay small where lam * cost is large, so f + g - lam C does not cancel (a
        # constant cost of 1e16 lost half the plan's mass without it).
        row = cost[k].double()
        neg = -lam * (row - row.amin(dim=1, keepdim=True))
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
        # exp(f + g - lam C) with g = log b - LSE_i(f - lam C), written as b_j * softmax_i(f_i - lam C_ij): the same
        # plan, but max-shifted, so it stays finite with exact column sums even where f + g - lam C would cancel
        # catastrophically (a huge spread of lam * cost).
        plans.append((torch.softmax(f[:, None] + neg, dim=0) * b[k][None, :]).to(cost.dtype))
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


def _momentum_step(memory: torch.Tensor, y: int, x: torch.Tensor, momentum: float) -> None:
    """``m[y] <- v / ||v||`` with ``v = mu m[y] + (1 - mu) x``; a ``v`` of zero norm (x exactly opposite m[y] at
    mu = 0.5, where the community code writes 0/0 = NaN) leaves the row as it was."""
    v = memory[y] * momentum + (1.0 - momentum) * x
    norm = v.norm()
    if bool(norm > 0):
        memory[y] = v / norm


def memory_update_ref(normalized: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, momentum: float,
                      update: str) -> None:
    """Literal per-sample memory update of cluster-contrast (in place on ``memory``).

    ``normalized``: (B, D) L2-normalised features in memory's dtype. Modes: "sequential" — for every sample in batch
    order ``m[y] = normalize(mu m[y] + (1 - mu) x)`` (repeated labels update repeatedly); "hard" (cm_hard) — per label
    present, the member with the smallest ``x . m[y]`` (first in batch order on ties) gives one such step; "mean" — one
    step towards the mean of the label's members; "none" — no update. Renormalisation divides by the plain norm, as the
    community code does, except that a step whose sum has zero norm keeps the row unchanged (never NaN).
    """
    if update == "none":
        return
    if update == "sequential":
        for x, y in zip(normalized, targets.tolist(), strict=True):
            _momentum_step(memory, y, x, momentum)
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
        _momentum_step(memory, y, chosen, momentum)


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
    # Fresh outputs: the slices of prop and nonzero's columns would share storage (opcheck refuses aliased outputs).
    return prop[:nv].clone(), prop[nv:].clone(), crow, cols.clone(), g[rows, cols]


# Clustering: exact kNN, k-reciprocal Jaccard distance, DBSCAN (spec: shared/spec/jaccard.md, cmfp_sinkhorn_dbscan.md)
# ---------------------------------------------------------------------------------------------------------------------


def knn_ref(x: torch.Tensor, y: torch.Tensor, k: int, metric: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every row of ``x`` among the rows of ``y``.

    Args:
        x: (N, d) float32 queries; y: (M, d) float32 database; 1 <= k <= M.
        metric: ``"ip"`` (largest inner product first) or ``"l2"`` (smallest squared Euclidean distance first).
        precision: ``"fp32"`` or ``"bf16"``, the candidate search of the fast kernels; the result does not depend on it.
    Returns:
        values (N, k) float32 (inner products or squared distances), indices (N, k) int64.

    Scores are computed in float64 from the float32 inputs; ties (equal float64 scores) go to the lower index.
    """
    xd, yd = x.double(), y.double()
    dots = xd @ yd.T
    if metric == "ip":
        key = -dots
    else:
        key = (xd * xd).sum(1, keepdim=True) + (yd * yd).sum(1)[None, :] - 2.0 * dots
    # A stable ascending sort keeps equal keys in index order: ties go to the lower index.
    order = torch.sort(key, dim=1, stable=True).indices[:, :k].contiguous()  # a fresh tensor, not a view
    best = key.gather(1, order)
    values = -best if metric == "ip" else best.clamp_min(0.0)
    return values.float(), order


def _kreciprocal_sets(initial_rank: list[list[int]], k: int) -> list[list[int]]:
    """recip(i, k): members j of R[i][:k+1], in that order, with i in R[j][:k+1]."""
    out = []
    for i, row in enumerate(initial_rank):
        forward = row[:k + 1]
        out.append([j for j in forward if i in initial_rank[j][:k + 1]])
    return out


def kreciprocal_jaccard_ref(features: torch.Tensor, initial_rank: torch.Tensor, rank_sim: torch.Tensor | None, k2: int,
                            modality: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-reciprocal Jaccard distance (cluster-contrast ``compute_jaccard_distance``), in CSR form.

    Args:
        features: (N, d) float32, L2-normalised (or not, with an L2 order in ``initial_rank``).
        initial_rank: (N, k1) int64, R[i] = the k1 nearest rows of ``features`` to row i, nearest first (by inner
            product, or by squared L2 for ``metric="l2"``; the steps below only read this order).
        rank_sim: None or (N, k1) float32, ``f_i . f_R[i][t]`` (the kNN's inner products), used instead of
            recomputing those products in step 4.
        k2: query-expansion size, 1 <= k2 <= k1 (1 = no expansion).
        modality: None or (N,) int64 of 0/1; if given, PCLHD's modality-invariant query expansion.
    Returns:
        crow (N+1,) int64, col (nnz,) int64 sorted within each row, values (nnz,) float32: every entry < 1 of the
        (N, N) distance; all other entries are 1.0.
    """
    n, k1 = initial_rank.shape
    feats = features.double()
    rank = initial_rank.tolist()
    kh = round(k1 / 2)  # Python's round is round-half-even, like np.around
    recip_k1 = _kreciprocal_sets(rank, k1)
    recip_kh = _kreciprocal_sets(rank, kh)

    # Steps 3-4: expansion and softmax encoding; V is a dense (N, N) float64 matrix here for readability.
    v = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        a_i = recip_k1[i]
        expansion = list(a_i)
        for c in a_i:
            h_c = recip_kh[c]
            if len(set(h_c) & set(a_i)) > 2 / 3 * len(h_c):
                expansion += h_c
        members = sorted(set(expansion))
        sims = feats[members] @ feats[i]
        if rank_sim is not None:
            # +-Inf: a product beyond float32's range, recomputed in float64 like the kernels do
            known = {j: float(s) for j, s in zip(rank[i], rank_sim[i].tolist(), strict=True) if math.isfinite(s)}
            sims = torch.tensor([known.get(j, float(sims[t])) for t, j in enumerate(members)], dtype=torch.float64)
        dist = 2.0 - 2.0 * sims
        v[i, members] = torch.softmax(-dist, dim=0)

    # Step 5: query expansion over R[i][:k2] (i itself included as R[i][0]).
    if k2 != 1:
        v_qe = torch.zeros_like(v)
        for i in range(n):
            neighbours = rank[i][:k2]
            if modality is None:
                v_qe[i] = v[neighbours].mean(0)
            else:
                # Mean over each modality's members separately, then the mean of the present modalities' means.
                means = [v[[j for j in neighbours if int(modality[j]) == m]].mean(0)
                         for m in (0, 1) if any(int(modality[j]) == m for j in neighbours)]
                v_qe[i] = torch.stack(means).mean(0)
        v = v_qe

    # Step 6: s_ij = sum_c min(V_ic, V_jc); distance 1 - s / (2 - s), clamped at 0. Pairs sharing no column are 1.
    crow, cols, vals = [0], [], []
    for i in range(n):
        s = torch.minimum(v[i][None, :], v).sum(1)
        dist = (1.0 - s / (2.0 - s)).clamp_min(0.0).float()
        keep = torch.nonzero(dist < 1.0).flatten()
        cols.append(keep)
        vals.append(dist[keep])
        crow.append(crow[-1] + keep.numel())
    return (torch.tensor(crow, dtype=torch.int64), torch.cat(cols).to(torch.int64),
            torch.cat(vals).to(torch.float32))


def _dbscan_from_neighbours(neighbours: list[list[int]], min_samples: int) -> torch.Tensor:
    """sklearn's DBSCAN labelling given each point's eps-neighbourhood (the point itself counted if within eps)."""
    n = len(neighbours)
    core = [len(nb) >= min_samples for nb in neighbours]
    labels = [-1] * n
    next_label = 0
    for start in range(n):
        if labels[start] != -1 or not core[start]:
            continue
        # Grow one cluster from its smallest-index unlabelled core point; border points keep the first label given.
        stack = [start]
        labels[start] = next_label
        while stack:
            p = stack.pop()
            if not core[p]:
                continue
            for q in neighbours[p]:
                if labels[q] == -1:
                    labels[q] = next_label
                    stack.append(q)
        next_label += 1
    return torch.tensor(labels, dtype=torch.int64)


def dbscan_dense_ref(dist: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN on a precomputed dense (N, N) distance: labels (N,) int64, -1 = noise, as sklearn numbers them."""
    within = dist <= eps
    return _dbscan_from_neighbours([torch.nonzero(row).flatten().tolist() for row in within], min_samples)


def dbscan_csr_ref(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, eps: float, min_samples: int,
                   fill: float) -> torch.Tensor:
    """DBSCAN on an (N, N) distance in CSR form whose entries not stored equal ``fill``: labels (N,) int64."""
    n = crow.numel() - 1
    # Compared in the values' precision, as sklearn compares the float32 dense matrix with eps rounded to float32.
    eps, fill = (float(torch.tensor(v, dtype=values.dtype)) for v in (eps, fill))
    neighbours = []
    for i in range(n):
        lo, hi = int(crow[i]), int(crow[i + 1])
        stored = dict(zip(col[lo:hi].tolist(), values[lo:hi].tolist(), strict=True))
        neighbours.append([j for j in range(n) if stored.get(j, fill) <= eps])
    return _dbscan_from_neighbours(neighbours, min_samples)
