"""Literal (slow, loop-by-loop) implementations of the community semantics the compat modules reproduce.

Written from the repositories' facts (cluster-contrast ``faiss_rerank.py`` and ``cm.py``, PCLHD, PGM, HIL, MULT,
SALCR): the same steps in the same order, in plain numpy / torch loops, with exact kNN (float64 squared L2, ties to the
lower index) where the community code calls faiss's ``IndexFlatL2``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def exact_l2_rank(features: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of the k smallest exact squared L2 distances per row (self included), ties to the lower index."""
    x = features.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def _recip(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, :k + 1]
    keep = [j for j in forward if i in rank[j, :k + 1]]
    return np.array(keep, dtype=np.int64)


def jaccard(features: np.ndarray, k1: int, k2: int, rank: np.ndarray | None = None,
            modality: np.ndarray | None = None) -> np.ndarray:
    """The community ``compute_jaccard_distance`` (PCLHD's modal-invariant one when ``modality`` is given)."""
    f = features.astype(np.float32)
    n = f.shape[0]
    if rank is None:
        rank = exact_l2_rank(f, k1)
    half = int(np.around(k1 / 2))
    near = [_recip(rank, i, k1) for i in range(n)]
    near_half = [_recip(rank, i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        members = list(near[i])
        for c in near[i]:
            cand = near_half[c]
            if len(np.intersect1d(cand, near[i])) > 2 / 3 * len(cand):
                members.extend(cand)
        members = np.unique(np.array(members, dtype=np.int64))
        dots = f[members].astype(np.float64) @ f[i].astype(np.float64)
        w = np.exp(-(2 - 2 * dots) - np.max(-(2 - 2 * dots)))
        v[i, members] = w / w.sum()
    if k2 != 1:
        vq = np.zeros_like(v)
        for i in range(n):
            nb = rank[i, :k2]
            if modality is None:
                vq[i] = v[nb].mean(0)
            else:
                groups = [v[[j for j in nb if modality[j] == m]] for m in (1, 0)]
                means = [g.mean(0) for g in groups if len(g)]
                vq[i] = np.mean(means, axis=0)
        v = vq
    out = np.ones((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            s = np.minimum(v[i], v[j]).sum()
            out[i, j] = max(1 - s / (2 - s), 0.0)
    return out.astype(np.float32)


def cm_logits_and_update(inputs, targets, memory, momentum, order=None):
    """``CM``: logits ``x . m^T`` and, after the gradient, ``m[y] <- (μ m[y] + (1-μ) x) / norm`` sample by sample."""
    x = F.normalize(inputs, dim=1)
    logits = x @ memory.t()
    seq = range(len(targets)) if order is None else order

    def update():
        with torch.no_grad():
            for b in seq:
                y = int(targets[b])
                memory[y] = momentum * memory[y] + (1 - momentum) * x[b].detach()
                memory[y] /= memory[y].norm()
    return logits, update


def cm_hard_update(x, targets, memory, momentum):
    """``CM_Hard``: per label (first-appearance order), the member with the smallest ``x . m[y]`` moves the row."""
    with torch.no_grad():
        groups: dict[int, list[int]] = {}
        for b, y in enumerate(targets.tolist()):
            groups.setdefault(y, []).append(b)
        for y, members in groups.items():
            sims = [float(x[b] @ memory[y]) for b in members]
            hard = members[int(np.argmin(sims))]
            memory[y] = memory[y] * momentum + (1 - momentum) * x[hard]
            memory[y] /= memory[y].norm()


def hybrid_update(x, targets, memory, momentum):
    """PCLHD ``CM_Hybrid``: per label, the mean row [y] and the hard row [y + C] (hardness against the old row y)."""
    c = memory.shape[0] // 2
    with torch.no_grad():
        groups: dict[int, list[int]] = {}
        for b, y in enumerate(targets.tolist()):
            groups.setdefault(y, []).append(b)
        for y, members in groups.items():
            sims = [float(x[b] @ memory[y]) for b in members]
            mean = x[members].mean(0)
            memory[y] = memory[y] * momentum + (1 - momentum) * mean
            memory[y] /= memory[y].norm()
            hard = members[int(np.argmin(sims))]
            memory[y + c] = memory[y + c] * momentum + (1 - momentum) * x[hard]
            memory[y + c] /= memory[y + c].norm()
