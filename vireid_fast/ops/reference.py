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
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
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
        features: (N, d) float32, L2-normalised.
        initial_rank: (N, k1) int64, R[i] = the k1 nearest rows of ``features`` to row i, nearest first.
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
            known = {j: float(s) for j, s in zip(rank[i], rank_sim[i].tolist(), strict=True)}
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
    neighbours = []
    for i in range(n):
        lo, hi = int(crow[i]), int(crow[i + 1])
        stored = dict(zip(col[lo:hi].tolist(), values[lo:hi].tolist(), strict=True))
        neighbours.append([j for j in range(n) if stored.get(j, fill) <= eps])
    return _dbscan_from_neighbours(neighbours, min_samples)
