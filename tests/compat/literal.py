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


def _groups(targets) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for b, y in enumerate(targets.tolist()):
        out.setdefault(y, []).append(b)
    return out


def _step(memory, row, value, momentum):
    memory[row] = momentum * memory[row] + (1.0 - momentum) * value
    memory[row] /= memory[row].norm()


class LiteralCM(torch.autograd.Function):
    """The community ``CM`` family: forward ``x . m^T``; backward ``grad . m`` with m as it was, then the update loop
    named by ``mode``: "seq" (batch order), "perm" (order ``torch.randperm(B)`` drawn in backward), "weighted"
    (``x * w``), "hard" (cm_hard), "hybrid" (PCLHD CM_Hybrid), "instance" (PCLHD CM_Hard on features_ema), "none"."""

    @staticmethod
    def forward(ctx, x, targets, memory, momentum, mode, extra):
        ctx.save_for_backward(x)
        ctx.targets, ctx.memory, ctx.momentum, ctx.mode, ctx.extra = targets, memory, momentum, mode, extra
        return x.mm(memory.t())

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = grad.mm(ctx.memory)
        t, m, mu, mode = ctx.targets, ctx.memory, ctx.momentum, ctx.mode
        x = x.detach()
        with torch.no_grad():
            if mode == "seq":
                for b in range(len(t)):
                    _step(m, int(t[b]), x[b], mu)
            elif mode == "perm":
                order = torch.randperm(len(t))
                for b in order.tolist():
                    _step(m, int(t[b]), x[b], mu)
            elif mode == "weighted":
                for b in range(len(t)):
                    _step(m, int(t[b]), x[b] * ctx.extra[b], mu)
            elif mode == "hard":
                for y, members in _groups(t).items():
                    sims = [float(x[b] @ m[y]) for b in members]
                    _step(m, y, x[members[int(np.argmin(sims))]], mu)
            elif mode == "hybrid":
                c = m.shape[0] // 2
                for y, members in _groups(t).items():
                    sims = [float(x[b] @ m[y]) for b in members]
                    _step(m, y, torch.stack([x[b] for b in members]).mean(0), mu)
                    _step(m, y + c, x[members[int(np.argmin(sims))]], mu)
            elif mode == "instance":
                n_inst = ctx.extra
                c = m.shape[0] // n_inst
                for y, members in _groups(t).items():
                    rows = [y + c * i for i in range(n_inst)]
                    ids = np.random.choice(len(members), n_inst, replace=len(members) < 16)
                    m[rows] = torch.stack([x[b] for b in members])[ids]
        return grad_x, None, None, None, None, None


def cm(inputs, targets, memory, momentum, mode="seq", extra=None):
    """Logits ``normalize(inputs) . memory^T`` through :class:`LiteralCM`."""
    return LiteralCM.apply(F.normalize(inputs, dim=1), targets, memory, momentum, mode, extra)


def cluster_loss(inputs, targets, memory, temp, momentum, mode="seq", ca=None):
    """cluster-contrast's ``ClusterMemory.forward`` (HIL: ``ca`` per-sample weights)."""
    logits = cm(inputs, targets, memory, momentum, mode) / temp
    if ca is None:
        return F.cross_entropy(logits, targets)
    return (F.cross_entropy(logits, targets, reduction="none") * ca).mean()


def batch(seed: int, b: int = 24, c: int = 6, d: int = 16, rows: int | None = None):
    """Un-normalised inputs (B, D), labels (B,) covering [0, c) with repeats, and normalised prototypes (rows, D)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(b, d, generator=g) * (0.5 + torch.rand(b, 1, generator=g))
    targets = torch.cat([torch.arange(c), torch.randint(0, c, (b - c,), generator=g)])
    targets = targets[torch.randperm(b, generator=g)]
    memory = F.normalize(torch.randn(rows or c, d, generator=g), dim=1)
    return inputs, targets, memory


def assert_step(ours_out, lit_out, ours_x, lit_x, ours_mem, lit_mem, atol=1e-5):
    """Same output, same input gradient, same memory after the update."""
    torch.testing.assert_close(ours_out.detach(), lit_out.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(ours_x.grad, lit_x.grad, atol=atol, rtol=0)
    torch.testing.assert_close(ours_mem, lit_mem, atol=atol, rtol=0)


def sinkhorn(P, lam, max_iter=500, return_steps=False):
    """The seeds' ``sinkhorn_solver``: alternate row/column scalings of exp(-lam P); the relative change of the
    column scaling is measured every 10th step and the loop stops once it is <= 0.1."""
    k, n = P.shape
    kernel = torch.exp(-lam * P)
    alpha = torch.ones(k, 1) / k
    beta = torch.ones(n, 1) / n
    err, step = 1e6, 0
    while err > 1e-1 and step < max_iter:
        alpha = (1.0 / k) / kernel.mm(beta)
        new = (1.0 / n) / alpha.t().mm(kernel).t()
        if step % 10 == 0:
            err = np.nansum(np.abs((beta / new - 1).numpy()))
        beta = new
        step += 1
    plan = torch.diag(alpha.squeeze()).mm(kernel).mm(torch.diag(beta.squeeze()))
    return (plan, step) if return_steps else plan


def sqdist(x, y):
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.t()


def one_hot(labels, k):
    out = torch.zeros(len(labels), k)
    for i, lab in enumerate(labels.tolist()):
        out[i, lab] = 1
    return out
