"""k-reciprocal re-ranking for retrieval (Zhong et al., CVPR 2017), with bounded memory.

Semantics of the widely copied ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)``, for
N = Nq + Ng items:

1. ``D = [[q_q, q_g], [q_gᵀ, g_g]] ** 2`` (squared entries), ``O = (D / column_max(D))ᵀ`` — for symmetric inputs,
   every row divided by its own maximum;
2. ``R[i]`` = the ``k1 + 1`` smallest entries of row i of O (ties: lower index first); k-reciprocal set
   ``A_i = {j in R[i] : i in R[j]}`` and, with ``kh = round_half_even(k1 / 2)``, ``H_c`` the same with ``kh + 1``
   neighbours; expansion ``E_i = A_i ∪ {H_c : c in A_i, |H_c ∩ A_i| > 2/3 |H_c|}``;
3. ``V[i, j] = exp(-O[i, j]) / sum`` over ``j in E_i``; query expansion (``k2 != 1``): ``V[i] = mean of V[R[i][:k2]]``;
4. ``jaccard[i, j] = 1 - s / (2 - s)``, ``s = sum_c min(V[i, c], V[j, c])``;
   ``final = (1 - λ)·jaccard + λ·O``, returned for query rows and gallery columns.

Memory: the reference keeps several dense N x N float32 arrays (O, V, V after expansion, Jaccard). Here V is sparse
(a few hundred entries per row), O rows are rebuilt from the three input blocks in chunks of rows, and the Jaccard
term is accumulated for chunks of query rows only: peak extra memory is O(N·k1·k2 + chunk·N) besides the inputs and
the (Nq, Ng) output. It does not call the clustering ops (``vireid_fast.ops.knn``/``kreciprocal_jaccard``): those
take features, while re-ranking starts from distance matrices, ranks k1 + 1 neighbours with kh = round(k1 / 2) and
encodes with exp(-O) of the given distances, so neither the kNN search nor the op's encoding applies as is.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kreciprocal"]

_CHUNK_ELEMENTS = 1 << 23


def _as_float(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float array, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; clean the distances before re-ranking")
    return x.detach().cpu().float()


class _Rows:
    """Rows of O = (D / column_max(D))ᵀ rebuilt on demand from the three distance blocks."""

    def __init__(self, q_g, q_q, g_g):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.nq = q_q.shape[0]
        self.n = self.nq + g_g.shape[0]
        # Row i of Dᵀ is column i of D; D's column maxima are the row maxima of Dᵀ.
        self.scale = torch.empty(self.n)
        for s, e in self._chunks():
            self.scale[s:e] = self._raw(s, e).amax(1)
        self.scale = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))

    def _chunks(self):
        step = max(1, _CHUNK_ELEMENTS // self.n)
        return [(s, min(self.n, s + step)) for s in range(0, self.n, step)]

    def _raw(self, s: int, e: int) -> torch.Tensor:
        """Rows [s, e) of Dᵀ = [[q_qᵀ, q_g], [q_gᵀ, g_gᵀ]], squared."""
        parts = []
        if s < self.nq:
            a, b = s, min(e, self.nq)
            parts.append(torch.cat([self.q_q[:, a:b].T, self.q_g[a:b]], 1))
        if e > self.nq:
            a, b = max(s, self.nq) - self.nq, e - self.nq
            parts.append(torch.cat([self.q_g[:, a:b].T, self.g_g[:, a:b].T], 1))
        return torch.cat(parts, 0).square()

    def rows(self, s: int, e: int) -> torch.Tensor:
        return self._raw(s, e) / self.scale[s:e, None]


def _reciprocal(rank: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) mask: rank[i, t] is a reciprocal neighbour (i is among the first `width` of rank[rank[i, t]])."""
    fwd = rank[:, :width]
    back = fwd[fwd]  # (N, width, width)
    me = torch.arange(rank.shape[0])[:, None, None]
    return (back == me).any(-1)


def kreciprocal(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> torch.Tensor:
    """Re-ranked (Nq, Ng) distances by k-reciprocal encoding.

    Args:
        q_g: (Nq, Ng) query-gallery distances; q_q: (Nq, Nq); g_g: (Ng, Ng) — numpy or torch, finite floats.
        k1: neighbours for the k-reciprocal sets (N > k1 required); k2: query-expansion size (1 disables it);
        lambda_value: weight of the original distance in the final mix.
    Returns:
        (Nq, Ng) float32 torch tensor.
    """
    q_g, q_q, g_g = _as_float("q_g", q_g), _as_float("q_q", q_q), _as_float("g_g", g_g)
    nq, ng = q_g.shape
    if q_q.shape != (nq, nq):
        raise ValueError(f"q_q must be ({nq}, {nq}) to match q_g {tuple(q_g.shape)}, got {tuple(q_q.shape)}")
    if g_g.shape != (ng, ng):
        raise ValueError(f"g_g must be ({ng}, {ng}) to match q_g {tuple(q_g.shape)}, got {tuple(g_g.shape)}")
    n = nq + ng
    for name, value, low in (("k1", k1, 1), ("k2", k2, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if k1 >= n:
        raise ValueError(f"k1 must be < Nq + Ng = {n}, got {k1}; lower k1")
    if k2 > k1 + 1:
        raise ValueError(f"k2 must be <= k1 + 1 = {k1 + 1}, got {k2}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    lam = float(lambda_value)
    kh = int(np.around(k1 / 2.0))
    o = _Rows(q_g, q_q, g_g)

    # Initial ranking: the k1 + 1 nearest of every row (stable: ties go to the lower index).
    rank = torch.empty(n, k1 + 1, dtype=torch.int64)
    for s, e in o._chunks():
        rank[s:e] = torch.argsort(o.rows(s, e), dim=1, stable=True)[:, :k1 + 1]

    recip_a = _reciprocal(rank, k1 + 1)  # A_i as a mask over rank[i, :k1+1]
    recip_h = _reciprocal(rank, kh + 1)  # H_c as a mask over rank[c, :kh+1]
    # Expansion: candidate c = rank[i, t] (t in A_i) adds H_c when |H_c ∩ A_i| > 2/3 |H_c|.
    v_rows, v_cols, v_vals = [], [], []
    step = max(1, min(_CHUNK_ELEMENTS // ((k1 + 1) * (kh + 1) * (k1 + 1)), _CHUNK_ELEMENTS // n))
    for s in range(0, n, step):
        e = min(n, s + step)
        a_idx = rank[s:e]  # (B, k1+1)
        a_ok = recip_a[s:e]
        h_idx = rank[a_idx][:, :, :kh + 1]  # (B, k1+1, kh+1): H candidates of each c
        h_ok = recip_h[a_idx]
        in_a = ((h_idx[..., None] == a_idx[:, None, None, :]) & a_ok[:, None, None, :]).any(-1)
        inter = (in_a & h_ok).sum(-1)
        take = a_ok & (inter.double() > (2.0 / 3.0) * h_ok.sum(-1).double())
        members = torch.zeros(e - s, n, dtype=torch.bool)
        members.scatter_(1, a_idx, a_ok)
        rows_b = torch.arange(e - s)[:, None, None].expand_as(h_idx)
        extra = take[..., None] & h_ok
        members[rows_b[extra], h_idx[extra]] = True
        weights = torch.where(members, torch.exp(-o.rows(s, e)), torch.zeros(()))
        weights = weights / weights.sum(1, keepdim=True)
        r, c = torch.nonzero(members, as_tuple=True)
        v_rows.append(r + s)
        v_cols.append(c)
        v_vals.append(weights[r, c])
    v = torch.sparse_coo_tensor(torch.stack([torch.cat(v_rows), torch.cat(v_cols)]), torch.cat(v_vals),
                                (n, n), check_invariants=False).coalesce()
    if k2 != 1:
        qe_rows = torch.arange(n).repeat_interleave(k2)
        expand = torch.sparse_coo_tensor(torch.stack([qe_rows, rank[:, :k2].reshape(-1)]),
                                         torch.full((n * k2,), 1.0 / k2), (n, n),
                                         check_invariants=False).coalesce()
        v = torch.sparse.mm(expand, v).coalesce()
    row_of, col = v.indices()  # coalesced: sorted by row, then column
    val = v.values()
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row_of, minlength=n).cumsum(0)

    # Jaccard for query rows against the gallery columns, chunked over queries.
    out = torch.empty(nq, ng, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(val)))
    for s in range(0, nq, step):
        e = min(nq, s + step)
        dense = torch.zeros(e - s, n)
        lo, hi = int(crow[s]), int(crow[e])
        dense[row_of[lo:hi] - s, col[lo:hi]] = val[lo:hi]
        mins = torch.minimum(dense[:, col], val[None, :])  # (B, nnz): min(V[i, c], V[j, c]) for every stored (j, c)
        shared = torch.zeros(e - s, n).index_add_(1, row_of, mins)
        jaccard = 1.0 - shared / (2.0 - shared)
        out[s:e] = (jaccard * (1.0 - lam) + o.rows(s, e) * lam)[:, nq:]
    return out
