"""MULT's modality-unified label transfer (Eq. 1-13 of the MULT paper; exact semantics in
``shared/spec/methods/mult.md`` §4), without any N_v x N_r or N x N matrix.

* Sinkhorn runs in the log domain (float64 potentials) over row blocks of the squared-Euclidean cost, recomputed from
  the features block by block (or kept when ``cache_bytes`` allows). ``stop="community"`` is the official solver's
  rule (every 10th step ``sum_j |beta_j / beta'_j - 1| <= tol``, cap ``max_iter``); ``stop="tol"`` is the rule of
  :func:`vireid_fast.ops.sinkhorn` (row-marginal L1 error <= tol, checked every step).
* The heterogeneous affinities are row softmaxes given the potentials: ``H_vr[i] = softmax_j(g_j - lam C_ij)`` and
  ``H_rv[j] = softmax_i(f_i - lam C_ij)``; the transfer only needs their products with N x K label matrices, done
  per block.
* The homogeneous affinity is ``1 - D`` of the clustering's sparse Jaccard distance (self-loop 1), row-normalised, a
  sparse matrix; the paper's set Jaccard of the k-reciprocal sets (Eq. 5) is :func:`kreciprocal_set_affinity`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import knn, ot_assign
from ..ops.sparse import SparseDistance

__all__ = ["HeteroAffinity", "TransferResult", "homogeneous_affinity", "kreciprocal_set_affinity", "label_transfer",
           "mult_association", "propagate", "raw_centroids", "soft_labels"]

SINKHORN_STOPS = ("community", "tol")
LP_ORDERS = ("gauss_seidel", "jacobi")


def raw_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, D) float32 raw (not renormalised) mean of the rows of each cluster 0..K-1; label -1 (outliers) skipped.
    features: (N, D) float; labels: (N,) int64, clusters numbered 0..K-1 (K = max + 1)."""
    valid = labels >= 0
    num = int(labels.max()) + 1 if bool(valid.any()) else 0
    sums = torch.zeros(num, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels[valid].to(features.device), features[valid].double())
    counts = torch.bincount(labels[valid], minlength=num).clamp(min=1).to(sums)
    return (sums / counts[:, None].to(sums.device)).float()


class HeteroAffinity:
    """Entropic OT between the rows of ``x`` (N, d) and ``y`` (M, d) with uniform marginals 1/N, 1/M and cost
    ``||x_i - y_j||^2``, solved in row blocks; afterwards the row-normalised plan and its transpose act on label
    matrices (:meth:`vr`, :meth:`rv`) without ever holding the (N, M) plan.

    Args:
        x: (N, d), y: (M, d) float32/float64 features (the cost is computed in their dtype, float32 for the seeds).
        lam: λ of ``exp(-λ C)``.
        block_bytes: bytes of one float64 (rows, M) working block (sets the row-block size).
        cache_bytes: keep the float32 cost blocks when N * M * 4 <= cache_bytes (else recompute them every pass).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, lam: float, *, block_bytes: int = 64 << 20,
                 cache_bytes: int = 256 << 20):
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(f"x (N, d) and y (M, d) must be 2-D and share d, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ValueError(f"x and y need at least one row each, got {x.shape[0]} and {y.shape[0]}; the OT problem "
                             "is empty")
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.x, self.y, self.lam = x, y, float(lam)
        self.n, self.m = x.shape[0], y.shape[0]
        self.rows = max(1, min(self.n, block_bytes // (8 * self.m)))
        self._x2 = (x * x).sum(1)
        self._y2 = (y * y).sum(1)
        self._cache: list[torch.Tensor] | None = [] if self.n * self.m * 4 <= cache_bytes else None
        self.f = torch.full((self.n,), -math.log(self.n), dtype=torch.float64, device=x.device)
        self.g = torch.full((self.m,), -math.log(self.m), dtype=torch.float64, device=x.device)
        self.n_iter, self.err = 0, float("inf")
        self._lse_rows: torch.Tensor | None = None
        self._lse_cols: torch.Tensor | None = None

    def _cost(self, start: int, stop: int) -> torch.Tensor:
        """(rows, M) float32/64 squared distances of rows start..stop, clamped at 0 (the seeds' addmm form)."""
        xb = self.x[start:stop]
        return torch.addmm(self._x2[start:stop, None] + self._y2[None, :], xb, self.y.t(), beta=1,
                           alpha=-2).clamp_min_(0)

    def blocks(self):
        """Yields (start, stop, -λ C[start:stop]) float64 blocks over all rows."""
        for b, start in enumerate(range(0, self.n, self.rows)):
            stop = min(self.n, start + self.rows)
            if self._cache is not None and b < len(self._cache):
                cost = self._cache[b]
            else:
                cost = self._cost(start, stop)
                if self._cache is not None:
                    self._cache.append(cost)
            yield start, stop, cost.double() * -self.lam  # a new tensor: the cached block stays the cost

    def _row_lse(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.n, dtype=torch.float64, device=g.device)
        for start, stop, neg in self.blocks():
            out[start:stop] = torch.logsumexp(neg + g[None, :], dim=1)
        return out

    def _col_lse(self, f: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.m,), -math.inf, dtype=torch.float64, device=f.device)
        for start, stop, neg in self.blocks():
            out = torch.logaddexp(out, torch.logsumexp(neg + f[start:stop, None], dim=0))
        return out

    def solve(self, *, stop: str = "community", max_iter: int = 500, tol: float = 0.1) -> HeteroAffinity:
        """Run Sinkhorn; sets the log-potentials ``f`` (N,), ``g`` (M,) (plan = exp(f_i + g_j - λ C_ij)),
        ``n_iter`` and ``err``.

        ``community``: f = -log N - LSE_j(g - λC), g' = -log M - LSE_i(f - λC); at steps 0, 10, 20, ...
        err = Σ_j |exp(g_j - g'_j) - 1| (non-finite terms skipped); g = g'; stop when err <= tol or after max_iter
        steps (start g = -log M; any constant start gives the same iterates). ``tol``: the
        :func:`vireid_fast.ops.sinkhorn` iteration (g = 0, f first; stop once the row-sum L1 error <= tol).
        """
        if stop not in SINKHORN_STOPS:
            raise ValueError(f"stop must be one of {SINKHORN_STOPS}, got {stop!r}")
        log_m = -math.log(self.m)
        lse_rows = None
        if stop == "community":
            g = torch.full((self.m,), log_m, dtype=torch.float64, device=self.x.device)
            step, err = 0, math.inf
            while err > tol and step < max_iter:
                _, f, lse_cols = self._sweep(g)
                g_new = log_m - lse_cols
                if step % 10 == 0:
                    terms = torch.expm1(g - g_new).abs()
                    err = float(terms[torch.isfinite(terms)].sum())
                g = g_new
                step += 1
        else:
            g = torch.zeros(self.m, dtype=torch.float64, device=self.x.device)
            _, f, lse_cols = self._sweep(g)
            step, err = 0, math.inf
            while step < max_iter:
                step += 1
                g = log_m - lse_cols
                lse_rows, f_next, lse_next = self._sweep(g)
                err = float((torch.exp(f + lse_rows) - 1.0 / self.n).abs().sum())
                if err <= tol or step == max_iter:
                    break
                f, lse_cols = f_next, lse_next
        self.f, self.g, self.n_iter, self.err = f, g, step, err
        # the column normaliser of the final f is the last g's denominator; the row one is known after a tol stop
        self._lse_rows, self._lse_cols = lse_rows, lse_cols
        return self

    def _sweep(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the cost blocks: lse_rows = LSE_j(g - λC), f = -log N - lse_rows, lse_cols = LSE_i(f - λC)
        (a row block's f needs only g, so both half-steps of a Sinkhorn iteration share the pass).

        One exponential per entry: with P_ij = exp(g_j - λC_ij - lse_rows_i) (the row softmax),
        Σ_i exp(f_i - λC_ij) = exp(-g_j) / N · Σ_i P_ij. Where a column's Σ_i P_ij underflows (a column far from
        every row while g is far from converged) the column sums are redone as log-sum-exps."""
        log_n = -math.log(self.n)
        lse_rows = torch.empty(self.n, dtype=torch.float64, device=g.device)
        col_sums = torch.zeros(self.m, dtype=torch.float64, device=g.device)
        for start, stop, neg in self.blocks():
            x = neg.add_(g[None, :])
            peak = x.amax(dim=1, keepdim=True)
            x = x.sub_(peak).exp_()
            sums = x.sum(dim=1, keepdim=True)
            lse_rows[start:stop] = (peak + sums.log()).squeeze(1)
            col_sums += x.div_(sums).sum(dim=0)
        f = log_n - lse_rows
        if bool((col_sums < 1e-290).any()):
            return lse_rows, f, self._col_lse(f)
        return lse_rows, f, col_sums.log_() - g + log_n

    def _normalisers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lse_rows is None:
            self._lse_rows = self._row_lse(self.g)
        if self._lse_cols is None:
            self._lse_cols = self._col_lse(self.f)
        return self._lse_rows, self._lse_cols

    def row_argmax(self) -> torch.Tensor:
        """(N,) int64 argmax of each plan row = argmax_j (g_j - λ C_ij) (first index on ties)."""
        out = torch.empty(self.n, dtype=torch.int64, device=self.x.device)
        for start, stop, neg in self.blocks():
            out[start:stop] = (neg + self.g[None, :]).argmax(1)
        return out

    def row_softmax(self) -> torch.Tensor:
        """(N, M) float32 row-normalised plan — only for small M (the centroid problems, M = K)."""
        lse_rows, _ = self._normalisers()
        out = torch.empty(self.n, self.m, dtype=torch.float32, device=self.x.device)
        for start, stop, neg in self.blocks():
            out[start:stop] = torch.exp(neg + self.g[None, :] - lse_rows[start:stop, None])
        return out

    def vr(self, labels: torch.Tensor) -> torch.Tensor:
        """H_vr @ labels: (M, K) -> (N, K) float32, H_vr = diag(Π 1)^-1 Π."""
        lse_rows, _ = self._normalisers()
        out = torch.empty(self.n, labels.shape[1], dtype=torch.float32, device=labels.device)
        for start, stop, neg in self.blocks():
            # the exponent in float64 (potentials and costs cancel), the weights in float32 like the products
            weights = neg.add_(self.g[None, :]).sub_(lse_rows[start:stop, None]).float().exp_()
            out[start:stop] = weights @ labels.float()
        return out

    def rv(self, labels: torch.Tensor) -> torch.Tensor:
        """H_rv @ labels: (N, K) -> (M, K) float32, H_rv = diag(Π^T 1)^-1 Π^T."""
        _, lse_cols = self._normalisers()
        out = torch.zeros(self.m, labels.shape[1], dtype=torch.float32, device=labels.device)
        for start, stop, neg in self.blocks():
            weights = neg.add_(self.f[start:stop, None]).sub_(lse_cols[None, :]).float().exp_()
            out += weights.t() @ labels[start:stop].float()
        return out


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """Row-normalised (N, N) float32 sparse (coalesced COO) matrix from COO entries (duplicates summed)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.double(), (n, n), check_invariants=True).coalesce()
    idx, v = coo.indices(), coo.values()
    sums = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, idx[0], v)
    v = v / sums[idx[0]]
    return torch.sparse_coo_tensor(idx, v.float(), (n, n), is_coalesced=True, check_invariants=True)


def homogeneous_affinity(dist: SparseDistance) -> torch.Tensor:
    """A = diag(S 1)^-1 S with S = 1 - D on the stored entries of the sparse Jaccard distance (entries not stored
    have D = 1, so S = 0) and S_ii = 1 (self-loop kept): (N, N) float32 sparse."""
    n = dist.shape[0]
    crow, col, vals = dist.crow, dist.col, dist.vals
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())
    off = rows != col
    diag = torch.arange(n, device=crow.device)
    return _csr(torch.cat([rows[off], diag]), torch.cat([col[off], diag]),
                torch.cat([1.0 - vals[off].double(), torch.ones(n, dtype=torch.float64, device=vals.device)]), n)


def kreciprocal_set_affinity(features: torch.Tensor, k: int = 30) -> torch.Tensor:
    """The paper's Eq. 5: S_ij = |R(i) ∩ R(j)| / |R(i) ∪ R(j)| of the k-reciprocal sets R(i) = {j in N(i, k):
    i in N(j, k)} (N(i, k): the k + 1 nearest rows by inner product, i included), row-normalised: (N, N) float32
    sparse (nnz bounded by N·(k + 1)^2; S_ii = 1). features: (N, d), L2-normalised."""
    n = features.shape[0]
    k = min(k, n - 1)
    _, rank = knn(features.float().contiguous(), k + 1)
    rank = rank.cpu()
    member = (rank[rank] == torch.arange(n)[:, None, None]).any(2)  # (N, k+1): i in N(rank[i, t], k)
    rows = torch.arange(n)[:, None].expand_as(rank)[member]
    cols = rank[member]
    sizes = torch.bincount(rows, minlength=n).double()
    incidence = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(rows.numel(), dtype=torch.float64),
                                        (n, n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # torch's "sparse CSR is beta" notice, raised inside sparse.mm
        warnings.simplefilter("ignore", UserWarning)
        inter = torch.sparse.mm(incidence, incidence.t()).coalesce()
    i, j = inter.indices()
    common = inter.values()
    sim = common / (sizes[i] + sizes[j] - common)
    return _csr(i, j, sim, n)


def propagate(own_init: torch.Tensor, other_init: torch.Tensor, a_own: torch.Tensor, a_other: torch.Tensor,
              h_own, h_other, *, alpha: float, max_iter: int = 20, tol: float = 0.01, order: str = "gauss_seidel"
              ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One label-space transfer (Eq. 11-12 with the code's order and stop).

    Args:
        own_init: (N_own, K) Y⁰; other_init: (N_oth, K) Ŷ⁰; a_own (N_own, N_own), a_other: row-stochastic
            (sparse) homogeneous affinities; h_own(X): H_own→oth @ X, (N_oth, K) -> (N_own, K); h_other(Y):
            H_oth→own @ Y.
        order: ``gauss_seidel`` (code: the Ŷ update uses the fresh Y) or ``jacobi`` (paper Eq. 12: the previous Y).
    Returns:
        Y (N_own, K), Ŷ (N_oth, K) float32, iterations, final δ.
    Per iteration: Y = (1-α) h_own(Ŷ) + α Y⁰; Ŷ = (1-α) h_other(Y) + α Ŷ⁰; Y = ½ A_own Y + ½ Y; Ŷ = ½ A_oth Ŷ + ½ Ŷ;
    δ = max(Σ|Ŷ - Ŷ_prev| / ΣŶ_prev, Σ|Y - Y_prev| / ΣY_prev); stop when δ <= tol or after max_iter iterations.
    """
    if order not in LP_ORDERS:
        raise ValueError(f"order must be one of {LP_ORDERS}, got {order!r}")
    y0, yh0 = own_init.float(), other_init.float()
    y, yh = y0, yh0
    delta, it = math.inf, 0
    while delta > tol and it < max_iter:
        prev_y, prev_yh = y, yh
        y = (1 - alpha) * h_own(prev_yh) + alpha * y0
        yh = (1 - alpha) * h_other(y if order == "gauss_seidel" else prev_y) + alpha * yh0
        y = 0.5 * (a_own @ y) + 0.5 * y
        yh = 0.5 * (a_other @ yh) + 0.5 * yh
        delta = max(float((yh - prev_yh).abs().sum() / prev_yh.sum()), float((y - prev_y).abs().sum() / prev_y.sum()))
        it += 1
    return y, yh, it, delta


def soft_labels(transferred: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13: hard = argmax per row (first on ties), soft = β onehot(hard) + (1 - β) Y. (N, K) -> (N,), (N, K)."""
    hard = transferred.argmax(1)
    soft = (1 - beta) * transferred.float()
    soft[torch.arange(hard.numel(), device=hard.device), hard] += beta
    return hard, soft


@dataclass
class TransferResult:
    """The four transferred label matrices (float32, rows sum to 1) and diagnostics.

    y_v (N_v, K_v) visible intra; yh_r (N_r, K_v) infrared in the V-space; y_r (N_r, K_r) infrared intra;
    yh_v (N_v, K_r) visible in the R-space; info: iteration counts and errors."""

    y_v: torch.Tensor
    yh_r: torch.Tensor
    y_r: torch.Tensor
    yh_v: torch.Tensor
    info: dict


def _cross_init(features: torch.Tensor, centres: torch.Tensor, lam: float, stop: str, max_iter: int, tol: float,
                mode: str, info: dict, key: str, **blocks) -> torch.Tensor:
    """Ŷ⁰ from the OT of instances to the other modality's centroids: one-hot argmax (code) or the row-normalised plan
    (``soft_plan``)."""
    if stop == "tol":  # the project's op: its plan (row sums 1/N) is what the paper's OTLA would return
        assign, plan = ot_assign(features.float(), centres.float(), lam, max_iter=max_iter, tol=tol)
        info[key] = -1
        if mode == "soft_plan":
            return (plan / plan.sum(1, keepdim=True)).float()
        return F.one_hot(assign, centres.shape[0]).float()
    ot = HeteroAffinity(features, centres, lam, **blocks).solve(stop=stop, max_iter=max_iter, tol=tol)
    info[key] = ot.n_iter
    if mode == "soft_plan":
        return ot.row_softmax()
    return F.one_hot(ot.row_argmax(), centres.shape[0]).float()


def label_transfer(features_v: torch.Tensor, features_r: torch.Tensor, centres_v: torch.Tensor,
                   centres_r: torch.Tensor, a_v: torch.Tensor, a_r: torch.Tensor, *, alpha: float = 0.2,
                   init_temp: float = 0.05, lam: float = 25.0, ot_stop: str = "community", ot_max_iter: int = 500,
                   ot_tol: float = 0.1, lp_max_iter: int = 20, lp_tol: float = 0.01, lp_order: str = "gauss_seidel",
                   cross_init: str = "onehot", init_centroids: str = "raw", block_bytes: int = 64 << 20,
                   cache_bytes: int = 256 << 20) -> TransferResult:
    """MULT (spec §4 A-F) on all instances, outliers included.

    Args:
        features_v (N_v, d), features_r (N_r, d): L2-normalised extraction features.
        centres_v (K_v, d), centres_r (K_r, d): raw DBSCAN centroids (:func:`raw_centroids`).
        a_v (N_v, N_v), a_r (N_r, N_r): row-stochastic homogeneous affinities (:func:`homogeneous_affinity`).
        init_centroids: ``raw`` (code) or ``normalized`` (paper: P(f | M̃, τ)) centroids for Y⁰.
        cross_init: ``onehot`` (code) or ``soft_plan`` (row-normalised OT plan).
    Returns: :class:`TransferResult`.
    """
    blocks = dict(block_bytes=block_bytes, cache_bytes=cache_bytes)
    info: dict = {}
    cv, cr = centres_v.float(), centres_r.float()
    if init_centroids == "normalized":
        cv, cr = F.normalize(cv, dim=1), F.normalize(cr, dim=1)
    elif init_centroids != "raw":
        raise ValueError(f"init_centroids must be 'raw' or 'normalized', got {init_centroids!r}")
    if cross_init not in ("onehot", "soft_plan"):
        raise ValueError(f"cross_init must be 'onehot' or 'soft_plan', got {cross_init!r}")
    y_v0 = torch.softmax(features_v.float() @ cv.t() / init_temp, dim=1)
    y_r0 = torch.softmax(features_r.float() @ cr.t() / init_temp, dim=1)
    ot_args = dict(stop=ot_stop, max_iter=ot_max_iter, tol=ot_tol, mode=cross_init, info=info, **blocks)
    yh_r0 = _cross_init(features_r, centres_v, lam, key="ot_iter/r_to_cv", **ot_args)
    yh_v0 = _cross_init(features_v, centres_r, lam, key="ot_iter/v_to_cr", **ot_args)
    hetero = HeteroAffinity(features_v, features_r, lam, **blocks).solve(stop=ot_stop, max_iter=ot_max_iter,
                                                                         tol=ot_tol)
    info["ot_iter/instances"] = hetero.n_iter
    lp = dict(alpha=alpha, max_iter=lp_max_iter, tol=lp_tol, order=lp_order)
    y_v, yh_r, info["lp_iter/v_space"], _ = propagate(y_v0, yh_r0, a_v, a_r, hetero.vr, hetero.rv, **lp)
    y_r, yh_v, info["lp_iter/r_space"], _ = propagate(y_r0, yh_v0, a_r, a_v, hetero.rv, hetero.vr, **lp)
    return TransferResult(y_v, yh_r, y_r, yh_v, info)


def mult_association(features_v, features_r, labels_v, labels_r, a_v, a_r, **kwargs) -> TransferResult:
    """:func:`label_transfer` with the raw centroids of the DBSCAN labels (N,) int64 (-1 = outlier) of each
    modality; both modalities need at least one cluster."""
    for name, lab in (("labels_v", labels_v), ("labels_r", labels_r)):
        if not bool((lab >= 0).any()):
            raise ValueError(f"{name} has no cluster (all outliers); MULT needs at least one cluster per modality — "
                             "raise cluster.eps or lower cluster.min_samples")
    return label_transfer(features_v, features_r, raw_centroids(features_v, labels_v),
                          raw_centroids(features_r, labels_r), a_v, a_r, **kwargs)
