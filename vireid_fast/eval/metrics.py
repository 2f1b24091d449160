"""Vectorised retrieval metrics with the SYSU-MM01 / RegDB protocols of the community evaluation code.

Semantics (``shared/spec/evaluation.md``): each query ranks the gallery by ascending distance, ties broken by gallery
index (a stable sort). Under ``protocol="sysu"`` every gallery item from camera 2 is dropped for a query from camera 3
(regardless of identity); under ``protocol="regdb"`` nothing is dropped. Over the kept list:

* ``AP = sum_k precision@k * rel_k / n_rel`` and ``INP = n_rel / rank_of_last_relevant`` (1-based);
* the standard CMC: ``cmc[r] = share of valid queries with a true match within the first r + 1``;
* the SYSU authors' CMC (``cmc_unique``): identities de-duplicated in rank order (first occurrence kept), then the same
  cumulative hit curve over that identity list. Curves are summed over all queries and divided by the number of
  *valid* queries (those with at least one true match left); AP/INP are averaged over valid queries.

Instead of a Python loop per query, everything is computed with vectorised array operations over chunks of bounded
size (about ``chunk_elements`` distance entries each), without sorting the rows (see :func:`evaluate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PROTOCOLS", "RetrievalResult", "evaluate"]

PROTOCOLS = ("sysu", "regdb")
_CHUNK_ELEMENTS = 1 << 22  # gallery entries per query chunk (~100 MB of temporaries)


@dataclass
class RetrievalResult:
    """Metrics of one evaluation.

    Attributes:
        cmc: (max_rank,) float64, standard CMC (share of valid queries matched within rank r + 1).
        cmc_unique: (max_rank,) float64, the SYSU authors' identity-de-duplicated CMC (what ``eval_sysu`` returns).
        mAP, mINP: means over valid queries.
        ap, inp: (num_q,) float64 per-query AP and INP; NaN for queries without a true match.
        valid: (num_q,) bool, queries with at least one true match after removal.
        protocol: ``"sysu"`` or ``"regdb"``; max_rank: length of the curves (min(requested, num_g)).
        num_unique: (num_q,) int64 number of distinct identities in each query's kept list (the length the
            community code gives that query's de-duplicated curve before truncation).
    """

    cmc: np.ndarray
    cmc_unique: np.ndarray
    mAP: float
    mINP: float
    ap: np.ndarray
    inp: np.ndarray
    valid: np.ndarray
    protocol: str
    max_rank: int
    num_unique: np.ndarray = field(repr=False)

    @property
    def reported_cmc(self) -> np.ndarray:
        """The curve papers report: ``cmc_unique`` for SYSU-MM01, the standard ``cmc`` for RegDB."""
        return self.cmc_unique if self.protocol == "sysu" else self.cmc

    def rank(self, r: int, *, standard: bool = False) -> float:
        """Rank-``r`` accuracy (1-based) from :attr:`reported_cmc` (or the standard CMC); NaN if r > max_rank."""
        curve = self.cmc if standard else self.reported_cmc
        return float(curve[r - 1]) if 1 <= r <= len(curve) else float("nan")

    @property
    def rank1(self) -> float:
        return self.rank(1)

    @property
    def rank5(self) -> float:
        return self.rank(5)

    @property
    def rank10(self) -> float:
        return self.rank(10)

    @property
    def rank20(self) -> float:
        return self.rank(20)

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def summary(self) -> dict[str, float]:
        """``{"rank1", "rank5", "rank10", "rank20", "mAP", "mINP"}`` as floats (fractions, not percent)."""
        return {"rank1": self.rank1, "rank5": self.rank5, "rank10": self.rank10, "rank20": self.rank20,
                "mAP": float(self.mAP), "mINP": float(self.mINP)}

    def to_dict(self, *, per_query: bool = False) -> dict:
        out = {"protocol": self.protocol, "max_rank": self.max_rank, "num_query": int(len(self.valid)),
               "num_valid_query": self.num_valid, **self.summary(), "cmc": self.cmc.tolist(),
               "cmc_unique": self.cmc_unique.tolist()}
        if per_query:
            nan_to_none = lambda a: [None if v != v else float(v) for v in a]
            out["ap"] = nan_to_none(self.ap)
            out["inp"] = nan_to_none(self.inp)
        return out

    def to_json(self, path: str | None = None, *, per_query: bool = False, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(per_query=per_query), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text


def _as_array(name: str, x, *, floating: bool) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arr = t.numpy()
    elif isinstance(x, (np.ndarray, list, tuple)):
        arr = np.asarray(x)
    else:
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")
    kind = arr.dtype.kind
    if floating:
        if kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        return arr if kind == "f" and arr.dtype.itemsize >= 4 else arr.astype(np.float64)
    if kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must hold integer labels, got non-integer floats")
    elif kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
    dist = _as_array("distmat", distmat, floating=True)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    if num_q == 0:
        raise ValueError("distmat has no query rows; pass at least one query")
    if num_g == 0:
        raise ValueError("the gallery is empty (distmat has 0 columns); pass at least one gallery item")
    # A finite sum proves every entry finite; only a non-finite sum (or overflow) needs the elementwise check.
    if not np.isfinite(dist.sum(dtype=np.float64)) and not np.isfinite(dist).all():
        raise ValueError("distmat contains NaN or Inf; clean the distances (e.g. check the features) before evaluating")
    qp = _as_array("q_pids", q_pids, floating=False).reshape(-1)
    gp = _as_array("g_pids", g_pids, floating=False).reshape(-1)
    if len(qp) != num_q:
        raise ValueError(f"q_pids has {len(qp)} entries but distmat has {num_q} query rows")
    if len(gp) != num_g:
        raise ValueError(f"g_pids has {len(gp)} entries but distmat has {num_g} gallery columns")
    qc = gc = None
    if protocol == "sysu":
        if q_camids is None or g_camids is None:
            raise ValueError("protocol='sysu' needs q_camids and g_camids (camera 3 queries drop camera 2 gallery)")
        qc = _as_array("q_camids", q_camids, floating=False).reshape(-1)
        gc = _as_array("g_camids", g_camids, floating=False).reshape(-1)
        if len(qc) != num_q:
            raise ValueError(f"q_camids has {len(qc)} entries but distmat has {num_q} query rows")
        if len(gc) != num_g:
            raise ValueError(f"g_camids has {len(gc)} entries but distmat has {num_g} gallery columns")
    return dist, qp, gp, qc, gc


def evaluate(distmat, q_pids, g_pids, q_camids=None, g_camids=None, *, protocol: str = "sysu", max_rank: int = 20,
             chunk_elements: int = _CHUNK_ELEMENTS) -> RetrievalResult:
    """Evaluate a query x gallery distance matrix under the SYSU-MM01 or RegDB protocol.

    Args:
        distmat: (num_q, num_g) float distances (smaller = more similar), numpy or torch, finite.
        q_pids, g_pids: (num_q,), (num_g,) integer identities.
        q_camids, g_camids: integer cameras; required for ``protocol="sysu"``, ignored for ``"regdb"``.
        protocol: ``"sysu"`` (camera 3 queries drop camera 2 gallery items) or ``"regdb"`` (nothing dropped).
        max_rank: length of the CMC curves; capped at num_g as the community code does.
        chunk_elements: work is done in chunks of about this many distance entries (bounded memory).
    Returns:
        :class:`RetrievalResult`. Raises ValueError if no query has a true match left.

    No sort is needed: item g precedes item j in a query's ranking iff ``d_g < d_j`` or (``d_g == d_j`` and
    ``g < j``), so the kept rank of each true match is one plus the number of kept items preceding it, and the
    de-duplicated rank counts the distinct identities among the kept items preceding the first true match. The
    cost is O(num_true_matches x num_g), less than sorting every row when identities have few gallery images.
    The work is vectorised NumPy (single-threaded: on shared CPUs this beats many short multi-threaded kernels).
    """
    dist, qp, gp, qc, gc = _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank)
    num_q, num_g = dist.shape
    max_rank = int(min(max_rank, num_g))
    # Gallery identities as compact codes; a query whose pid is absent from the gallery gets code -1 (never valid).
    g_unique, g_code = np.unique(gp, return_inverse=True)
    g_code = g_code.reshape(-1)
    pos = np.minimum(np.searchsorted(g_unique, qp), len(g_unique) - 1)
    q_code = np.where(g_unique[pos] == qp, pos, -1)
    num_ids = len(g_unique)
    g_index = np.arange(num_g)
    # The only removal (SYSU): camera-3 queries drop camera-2 gallery items. Two keep masks exist at most.
    all_kept = np.ones(num_g, dtype=bool)
    keep_masks = np.stack([all_kept, all_kept if protocol == "regdb" else gc != 2])
    mask_of_query = np.zeros(num_q, dtype=np.int64) if protocol == "regdb" else (qc == 3).astype(np.int64)
    ids_left = np.array([len(np.unique(g_code[m])) for m in keep_masks], dtype=np.int64)
    num_unique = ids_left[mask_of_query]

    # Every (query, kept true match) pair, in (query, gallery index) order.
    step = max(1, int(chunk_elements) // num_g)
    hit_q, hit_g = [], []
    for s in range(0, num_q, step):
        e = min(num_q, s + step)
        hit = (g_code[None, :] == q_code[s:e, None]) & keep_masks[mask_of_query[s:e]]
        r, c = np.nonzero(hit)
        hit_q.append(r + s)
        hit_g.append(c)
    hit_q, hit_g = np.concatenate(hit_q), np.concatenate(hit_g)

    def preceding(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(len(queries), num_g) bool: kept gallery items ranked before `items` in each query's list."""
        rows = dist[queries]
        d_item = rows[np.arange(len(queries)), items][:, None]
        before = (rows < d_item) | ((rows == d_item) & (g_index[None, :] < items[:, None]))
        return before & keep_masks[mask_of_query[queries]]

    hit_rank = np.empty(len(hit_q), dtype=np.int64)  # 1-based kept rank of each true match
    for s in range(0, len(hit_q), step):
        e = min(len(hit_q), s + step)
        hit_rank[s:e] = preceding(hit_q[s:e], hit_g[s:e]).sum(1) + 1

    n_rel = np.bincount(hit_q, minlength=num_q)
    valid = n_rel > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (after the protocol's camera removal); "
                         "check that query and gallery identities overlap")
    # Order the hits by (query, rank): the i-th hit of a query (1-based) contributes precision i / rank.
    order = np.argsort(hit_q * (num_g + 1) + hit_rank, kind="stable")
    hq, hr, hg = hit_q[order], hit_rank[order], hit_g[order]
    first_pos = np.concatenate([[0], np.cumsum(n_rel)])
    nth = np.arange(len(hq)) - first_pos[hq] + 1
    ap_sum = np.bincount(hq, weights=nth / hr, minlength=num_q)
    last_rank = np.zeros(num_q, dtype=np.int64)
    last_rank[valid] = hr[first_pos[1:][valid] - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(valid, ap_sum / np.maximum(n_rel, 1), np.nan)
        inp = np.where(valid, n_rel / np.maximum(last_rank, 1), np.nan)

    # First true match of each valid query, and the distinct identities ranked before it.
    is_first = nth == 1
    fq, fg, first_rank = hq[is_first], hg[is_first], hr[is_first]
    unique_rank = np.empty_like(first_rank)
    id_step = max(1, int(chunk_elements) // max(num_g, num_ids))
    for s in range(0, len(fq), id_step):
        e = min(len(fq), s + id_step)
        r, c = np.nonzero(preceding(fq[s:e], fg[s:e]))
        seen = np.zeros((e - s) * num_ids, dtype=bool)
        seen[r * num_ids + g_code[c]] = True
        unique_rank[s:e] = seen.reshape(e - s, num_ids).sum(1) + 1
    cmc = _curve(first_rank, max_rank, num_valid)
    cmc_unique = _curve(unique_rank, max_rank, num_valid)
    return RetrievalResult(cmc=cmc, cmc_unique=cmc_unique, mAP=float(ap[valid].mean()), mINP=float(inp[valid].mean()),
                           ap=ap.astype(np.float64), inp=inp.astype(np.float64), valid=valid, protocol=protocol,
                           max_rank=max_rank, num_unique=num_unique)


def _curve(ranks: np.ndarray, max_rank: int, num_valid: int) -> np.ndarray:
    counts = np.bincount(np.minimum(ranks, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    return np.cumsum(counts) / num_valid


def hit_counts(result: RetrievalResult, *, unique: bool) -> np.ndarray:
    """(max_rank,) int64 number of valid queries matched within each rank (exact integers behind the curves)."""
    curve = result.cmc_unique if unique else result.cmc
    return np.rint(curve * result.num_valid).astype(np.int64)
