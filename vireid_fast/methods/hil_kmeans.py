"""Batched K-means with scikit-learn's semantics, for HIL's per-cluster sub-centres.

HIL runs ``sklearn.cluster.KMeans(K, random_state=0, n_init=10)`` (k-means++ initialisation, Lloyd, max 300
iterations, tol 1e-4) once per coarse cluster, several hundred small problems per epoch. :func:`batched_kmeans` runs
all of them together: clusters are bucketed by size into padded (G, n, D) blocks, and the ten initialisations of every
cluster advance in lockstep (one batched matmul per Lloyd step for the whole block).

What is reproduced from scikit-learn (``_kmeans.py``, ``_k_means_lloyd.pyx``; version 1.x):

* the data of each problem is centred on its mean; the tolerance is ``tol * mean(var(X, axis=0))``;
* the random stream: each problem gets a fresh ``RandomState(seed)`` (KMeans is called once per cluster), consumed
  init after init as ``choice`` (one ``random_sample``: the first centre, uniform weights) then, per further centre,
  ``uniform(size=2 + int(log K))`` scaled by the current potential and searched in the cumulative sum of the squared
  distances (float32, clipped to n - 1); the candidate with the lowest potential wins (first on ties). The draws do
  not depend on the data, so they are drawn once and shared by every problem;
* k-means++ distances in float64 rounded to float32 (scikit-learn's float32 "upcast" path); Lloyd in float32 with
  argmin over ``|c|^2 - 2 x.c`` (first minimum on ties);
* convergence: labels unchanged (strict), else ``sum |c_new - c_old|^2 <= tol``; a non-strict stop reruns the
  assignment against the final centres; empty clusters are re-seeded with the points farthest from their centre;
* among the n_init runs the first is kept unless a later one has a strictly lower inertia *and* a different partition.

Known differences: summation orders (float32 rounding) differ, so a run whose decision sits within rounding of a tie
(two equal distances, equal inertias, a random value on a cumulative-sum boundary) may go the other way; when several
clusters empty at once, scikit-learn's ``argpartition`` order is replaced by "farthest first, lower index on ties".
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["batched_kmeans", "kmeans_draws"]

#: Elements (n x D per problem, summed over a block) of one padded block of problems.
BLOCK_ELEMENTS = 1 << 24


def kmeans_draws(seed: int, n_init: int, k: int) -> torch.Tensor:
    """(n_init, 1 + (k - 1) L) float64: the uniform numbers scikit-learn's k-means++ consumes from
    ``RandomState(seed)`` over n_init initialisations, L = 2 + int(log k) local trials."""
    trials = 2 + int(np.log(k))
    draws = np.random.RandomState(seed).random_sample(n_init * (1 + (k - 1) * trials))
    return torch.from_numpy(draws.reshape(n_init, 1 + (k - 1) * trials))


def _plus_plus(gram: torch.Tensor, sizes: torch.Tensor, valid: torch.Tensor, k: int,
               draws: torch.Tensor) -> torch.Tensor:
    """k-means++ centre indices (I, G, k) int64 of a padded block with Gram matrices ``gram`` (G, n, n) float64 of
    the centred float32 points (the candidates are data points, so every distance is a Gram lookup)."""
    inits, groups, n = draws.shape[0], gram.shape[0], gram.shape[1]
    trials = 2 + int(np.log(k))
    sq64 = torch.diagonal(gram, dim1=1, dim2=2)                                 # (G, n)
    last = (sizes - 1)[None, :, None]                                           # clip as scikit-learn does
    # first centre: RandomState.choice(n, p = float32(1/n) each): cdf in float64, normalised, searchsorted right
    p = (1.0 / sizes.to(torch.float32)).to(torch.float64)
    cdf = torch.where(valid, p[:, None].expand(groups, n), torch.zeros((), dtype=torch.float64)).cumsum(1)
    cdf = cdf / cdf.gather(1, (sizes - 1)[:, None])
    cdf = torch.where(valid, cdf, torch.full((), 2.0, dtype=torch.float64))     # padding sorts after every draw
    first = torch.searchsorted(cdf.contiguous(), draws[:, 0][None, :].expand(groups, inits).contiguous(), right=True)
    chosen = first.T.contiguous()[..., None]                                    # (I, G, 1)
    g_index = torch.arange(groups)[None, :, None]

    def sq_dist(idx):  # (I, G, L) candidate indices -> (I, G, L, n) float32 squared distances (float64 inside)
        d = sq64[g_index, idx][..., None] + sq64[None, :, None, :] - 2.0 * gram[g_index, idx]
        return d.clamp_min(0.0).to(torch.float32).masked_fill(~valid[None, :, None, :], 0.0)

    closest = sq_dist(chosen)[:, :, 0]                                          # (I, G, n)
    pot = closest.sum(-1)                                                       # (I, G)
    for c in range(1, k):
        u = draws[:, 1 + (c - 1) * trials: 1 + c * trials]                      # (I, L)
        vals = u[:, None, :] * pot.to(torch.float64)[..., None]                 # (I, G, L) float64
        cum = closest.cumsum(-1).to(torch.float64)
        idx = torch.searchsorted(cum.contiguous(), vals.contiguous()).minimum(last)
        cand = torch.minimum(closest[:, :, None, :], sq_dist(idx))              # (I, G, L, n)
        cand_pot = cand.sum(-1)
        best = cand_pot.argmin(-1)                                              # first on ties
        pot = cand_pot.gather(2, best[..., None])[..., 0]
        closest = cand.gather(2, best[..., None, None].expand(-1, -1, 1, n))[:, :, 0]
        chosen = torch.cat([chosen, idx.gather(2, best[..., None])], dim=2)
    return chosen


def _products(gram: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres as weights over the points, c_k = sum_j weights[k, j] x_j: returns x_i . c_k (I, G, n, k) and
    |c_k|^2 (I, G, k), from the Gram matrices (G, n, n) and weights (I, G, k, n)."""
    inits, groups, k, n = weights.shape
    flat = weights.permute(1, 3, 0, 2).reshape(groups, n, inits * k)
    cross = torch.bmm(gram, flat).view(groups, n, inits, k).permute(2, 0, 1, 3)  # (I, G, n, k)
    sq = (cross * weights.transpose(2, 3)).sum(2)                                 # sum_i w_ki (x_i . c_k)
    return cross, sq


def _relocate_empty(sq_dist, labels, valid, members, counts):
    """scikit-learn's empty-cluster step: each empty cluster takes the point farthest from its (old) centre, which
    leaves its own cluster's sum. Rare (duplicate points); a loop over the affected (init, problem) pairs only."""
    for i, g in torch.nonzero((counts == 0).any(-1)).tolist():
        dist = sq_dist[i, g].masked_fill(~valid[g], -1.0)
        empties = torch.nonzero(counts[i, g] == 0).flatten()
        far = torch.sort(dist, descending=True, stable=True).indices[: empties.numel()]
        for new_id, point in zip(empties.tolist(), far.tolist(), strict=False):
            source = int(labels[i, g, point])
            members[i, g, source, point] -= 1
            members[i, g, new_id, point] = 1
            counts[i, g, source] -= 1
            counts[i, g, new_id] = 1


def _lloyd(gram, valid, tol, start, max_iter):
    """Lloyd from the point indices ``start`` (I, G, k) -> (labels (I, G, n), inertia (I, G)), every run stopping on
    its own; centres are kept as weights over the points (kernel form: every product is a Gram product)."""
    inits, groups, k = start.shape
    n = gram.shape[1]
    sq = torch.diagonal(gram, dim1=1, dim2=2)[None, :, :]                      # (1, G, n)
    weights = torch.nn.functional.one_hot(start, n).to(gram.dtype)              # (I, G, k, n)
    labels_old = torch.full((inits, groups, n), -1, dtype=torch.int64)
    active = torch.ones(inits, groups, dtype=torch.bool)
    strict = torch.zeros(inits, groups, dtype=torch.bool)
    strict_labels = labels_old.clone()
    mask = valid[None, :, :, None].to(gram.dtype)
    for _ in range(max_iter):
        cross, csq = _products(gram, weights)
        labels = (csq[:, :, None, :] - 2.0 * cross).argmin(-1)                  # argmin |c|^2 - 2 x.c
        members = (torch.nn.functional.one_hot(labels, k).to(gram.dtype) * mask).transpose(2, 3)  # (I, G, k, n)
        counts = members.sum(-1)
        if bool((counts == 0).any()):
            own = sq + csq.gather(2, labels) - 2.0 * cross.gather(3, labels[..., None])[..., 0]
            _relocate_empty(own, labels, valid, members, counts)
        new = members / counts.clamp_min(1)[..., None]
        delta = new - weights
        shift = (_products(gram, delta)[1]).sum(-1)                             # sum_k |c_new - c_old|^2
        same = ((labels == labels_old) | ~valid[None]).all(-1)
        done = active & (same | (shift <= tol[None, :]))
        strict |= active & same
        strict_labels = torch.where((active & same)[..., None], labels, strict_labels)
        weights = torch.where(active[..., None, None], new, weights)
        labels_old = torch.where(active[..., None], labels, labels_old)
        active &= ~done
        if not bool(active.any()):
            break
    cross, csq = _products(gram, weights)
    dist = csq[:, :, None, :] - 2.0 * cross
    labels = torch.where(strict[..., None], strict_labels, dist.argmin(-1))
    own = sq + dist.gather(3, labels[..., None])[..., 0]
    inertia = (own.clamp_min(0.0) * valid[None]).sum(-1)
    return labels, inertia


def _pick_best(labels: torch.Tensor, inertia: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """(G, n) labels of the kept run: the first, replaced by a later one with strictly lower inertia and a partition
    that is not the same up to relabelling (scikit-learn's ``_is_same_clustering(new, best)``)."""
    best, best_inertia = labels[0], inertia[0]
    for i in range(1, labels.shape[0]):
        pair = labels[i] * k + best                                             # (G, n)
        pair = torch.where(valid, pair, k * k)
        seen = torch.zeros(best.shape[0], k * k + 1).scatter_(1, pair, 1.0)[:, : k * k].view(-1, k, k)
        same = ((seen > 0).sum(-1) <= 1).all(-1)                                # new label -> one best label
        take = (inertia[i] < best_inertia) & ~same
        best = torch.where(take[:, None], labels[i], best)
        best_inertia = torch.where(take, inertia[i], best_inertia)
    return best


@torch.no_grad()
def batched_kmeans(features: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, *, n_init: int = 10,
                   seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """K-means (k clusters) run separately on the members of every group, as scikit-learn's
    ``KMeans(k, random_state=seed, n_init=n_init, max_iter=max_iter, tol=tol).fit(members).labels_`` would.

    Args:
        features: (N, D) float (computed in float32 on the CPU, like scikit-learn's float32 input).
        groups: (N,) int64 group of each row in [0, num_groups), -1 = in no group. Members keep dataset order.
        k: clusters per group, >= 1. n_init >= 1, max_iter >= 1, tol >= 0.
    Returns:
        (N,) int64 K-means label in [0, k) of every row of a group with more than k members whose best run uses all
        k labels; -1 for every other row (outside any group, a group of <= k members, or fewer than k distinct
        labels — scikit-learn's duplicate-points warning).
    """
    if features.dim() != 2 or groups.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) and groups (N,), got {tuple(features.shape)} and "
                         f"{tuple(groups.shape)}")
    if k < 1 or n_init < 1 or max_iter < 1 or tol < 0:
        raise ValueError(f"need k >= 1, n_init >= 1, max_iter >= 1 and tol >= 0, got k={k}, n_init={n_init}, "
                         f"max_iter={max_iter}, tol={tol}")
    x_all = features.detach().to("cpu", torch.float32)
    groups = groups.detach().to("cpu", torch.int64)
    out = torch.full((x_all.shape[0],), -1, dtype=torch.int64)
    member = groups >= 0
    if num_groups == 0 or not bool(member.any()):
        return out
    rows = torch.nonzero(member).flatten()
    rows = rows[torch.sort(groups[rows], stable=True).indices]                  # by group, dataset order inside
    sizes = torch.bincount(groups[rows], minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    eligible = torch.nonzero(sizes > k).flatten()
    eligible = eligible[torch.sort(sizes[eligible], descending=True, stable=True).indices]
    draws = kmeans_draws(seed, n_init, k)
    dim = x_all.shape[1]
    pos = 0
    while pos < eligible.numel():
        n = int(sizes[eligible[pos]])
        count = max(1, min(eligible.numel() - pos, BLOCK_ELEMENTS // max(1, n * dim, n * n * n_init * k)))
        block = eligible[pos: pos + count]
        pos += count
        bsizes = sizes[block]
        offs = torch.arange(n)
        valid = offs[None, :] < bsizes[:, None]                                 # (G, n)
        index = torch.where(valid, starts[block][:, None] + offs[None, :], 0)
        member_rows = rows[index]                                               # (G, n) dataset rows
        x64 = x_all[member_rows].double() * valid[..., None]
        mean = x64.sum(1) / bsizes[:, None].double()
        x64 = ((x64 - mean[:, None, :]) * valid[..., None]).float().double()  # float32 data, float64 arithmetic
        gram = torch.bmm(x64, x64.transpose(1, 2))                              # (G, n, n)
        del x64
        # scikit-learn's tolerance: tol * mean over features of the variance = tol * trace(gram) / (n D)
        block_tol = torch.diagonal(gram, dim1=1, dim2=2).sum(1) / (bsizes.double() * dim) * tol
        centre_idx = _plus_plus(gram, bsizes, valid, k, draws)                 # (I, G, k)
        labels, inertia = _lloyd(gram, valid, block_tol, centre_idx, max_iter)
        best = _pick_best(labels, inertia, valid, k)
        used = torch.zeros(block.numel(), k + 1).scatter_(1, torch.where(valid, best, k), 1.0)[:, :k]
        ok = (used > 0).all(1)
        keep = valid & ok[:, None]
        out[member_rows[keep]] = best[keep]
    return out
