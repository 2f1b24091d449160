"""PGM cross-modality cluster matching (Wu & Ye, "Unsupervised Visible-Infrared Person Re-Identification via
Progressive Graph Matching", CVPR 2023), as PCLHD's official code runs it once per stage-2 epoch.

Cost ``A = exp(-S)`` with ``S`` the cosine similarity of the per-modality cluster centres (``K_v x K_r``, cluster
counts, never samples); minimum-cost Hungarian assignment (scipy's ``linear_sum_assignment``) in up to three rounds:

1. ``A`` zero-padded to ``K_v x K_v``: rows on real columns match both ways; rows on padding columns form ``U``.
2. ``|U| < K_r``: ``A[U, :]`` gives every ``u`` a distinct infrared cluster (``v->r`` only; ``r->v`` keeps round 1).
3. ``|U| >= K_r``: the square block ``A'[U, :|U|]`` (zero-padded), real matches overwrite ``r->v``; rows left on
   padding (``U2``) are assigned on ``A[U2, :]``, overwriting ``r->v`` again.

The official code assumes ``K_v >= K_r`` (the padding width is negative otherwise and it crashes, SYSU script) or
skips the epoch's cross term (RegDB script), and leaves visible clusters unmatched when ``K_v > 3 K_r`` (SYSU; RegDB:
when round 2 has more rows than columns), after which training fails on the missing key. ``compat="strict"``
reproduces that (raises, or empty maps for the RegDB variant); ``compat="safe"`` (default) swaps the roles of the
modalities when ``K_r > K_v``, matches a visible cluster left over to its most similar infrared centre, and leaves
empty clusters (zero centre) unmatched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["PGMMatch", "cluster_centres", "pgm_match"]


@dataclass
class PGMMatch:
    """``visible_to_infrared`` (K_v,) and ``infrared_to_visible`` (K_r,) int64 cluster maps, -1 = unmatched;
    ``swapped``: the safe mode ran with the modalities' roles exchanged (K_r > K_v); ``fallback``: visible clusters
    matched by nearest centre after the Hungarian rounds."""

    visible_to_infrared: torch.Tensor
    infrared_to_visible: torch.Tensor
    swapped: bool = False
    fallback: int = 0

    def map_labels(self, labels: torch.Tensor, source: str) -> torch.Tensor:
        """(B,) int64 labels of ``source`` ("visible"/"infrared") clusters -> the matched clusters of the other
        modality (-1 where unmatched or the label is an outlier)."""
        if source not in ("visible", "infrared"):
            raise ValueError(f"source must be 'visible' or 'infrared', got {source!r}")
        table = self.visible_to_infrared if source == "visible" else self.infrared_to_visible
        table = table.to(labels.device)
        valid = (labels >= 0) & (labels < table.numel())
        out = torch.full_like(labels, -1)
        out[valid] = table[labels[valid]]
        return out


def cluster_centres(features: torch.Tensor, labels: torch.Tensor, num_clusters: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, D) float64 un-normalised mean of each cluster 0..C-1 and its (C,) int64 member count (label -1 excluded;
    an empty cluster has a zero centre)."""
    valid = labels >= 0
    num = int(labels[valid].max()) + 1 if bool(valid.any()) else 0
    num = num if num_clusters is None else num_clusters
    sums = torch.zeros(num, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels[valid].cpu(), features[valid].cpu().double())
    counts = torch.bincount(labels[valid].cpu(), minlength=num)
    return sums / counts.clamp(min=1)[:, None].double(), counts


def _assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def _rounds(cost: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """The official rounds on a (K_v, K_r) cost with K_v >= K_r: (v2r (K_v,), r2v (K_r,)), -1 = unmatched."""
    kv, kr = cost.shape
    v2r = np.full(kv, -1, dtype=np.int64)
    r2v = np.full(kr, -1, dtype=np.int64)
    padded = np.concatenate([cost, np.zeros((kv, kv - kr))], axis=1)
    rows, cols = _assign(padded)
    real = cols < kr
    v2r[rows[real]] = cols[real]
    r2v[cols[real]] = rows[real]
    unmatched = rows[~real]  # increasing row order (scipy returns rows sorted)
    if unmatched.size == 0:
        return v2r, r2v
    if unmatched.size < kr or variant == "regdb":
        sub_rows, sub_cols = _assign(cost[unmatched])
        v2r[unmatched[sub_rows]] = sub_cols
        return v2r, r2v
    block = padded[unmatched][:, : unmatched.size]
    sub_rows, sub_cols = _assign(block)
    real = sub_cols < kr
    v2r[unmatched[sub_rows[real]]] = sub_cols[real]
    r2v[sub_cols[real]] = unmatched[sub_rows[real]]
    second = unmatched[sub_rows[~real]]
    sub_rows, sub_cols = _assign(cost[second])
    v2r[second[sub_rows]] = sub_cols
    r2v[sub_cols] = second[sub_rows]
    return v2r, r2v


def pgm_match(visible_centres: torch.Tensor, infrared_centres: torch.Tensor, *, compat: str = "safe",
              variant: str = "sysu") -> PGMMatch:
    """Match visible clusters to infrared clusters (module docstring).

    visible_centres: (K_v, D), infrared_centres: (K_r, D) float cluster centres (normalised here; a zero row is an
    empty cluster). compat: "safe" | "strict"; variant: "sysu" | "regdb" (the official script whose rounds and
    failure modes ``strict`` reproduces; both agree whenever round 2 has fewer rows than K_r).
    """
    if compat not in ("safe", "strict"):
        raise ValueError(f"compat must be 'safe' or 'strict', got {compat!r}")
    if variant not in ("sysu", "regdb"):
        raise ValueError(f"variant must be 'sysu' or 'regdb', got {variant!r}")
    for name, x in (("visible_centres", visible_centres), ("infrared_centres", infrared_centres)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor (K, D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf; cluster centres must be finite")
    if visible_centres.shape[1] != infrared_centres.shape[1]:
        raise ValueError(f"visible_centres and infrared_centres must share D, got {visible_centres.shape[1]} and "
                         f"{infrared_centres.shape[1]}")
    v = torch.nn.functional.normalize(visible_centres.detach().cpu().double(), dim=1)
    r = torch.nn.functional.normalize(infrared_centres.detach().cpu().double(), dim=1)
    kv, kr = v.shape[0], r.shape[0]
    if compat == "strict":
        cost = torch.exp(-(v @ r.T)).numpy()
        if kr > kv:
            if variant == "regdb":
                return PGMMatch(torch.full((kv,), -1), torch.full((kr,), -1))
            raise ValueError(f"pgm_compat=strict (official SYSU script): {kr} infrared clusters > {kv} visible "
                             "clusters makes the padding width negative and the official code crashes; use "
                             "pgm_compat=safe")
        v2r, r2v = _rounds(cost, variant)
        if (v2r < 0).any():
            raise ValueError(f"pgm_compat=strict: {int((v2r < 0).sum())} of {kv} visible clusters stay unmatched "
                             f"({kv} visible vs {kr} infrared clusters) and the official code fails on the missing "
                             "key; use pgm_compat=safe")
        return PGMMatch(torch.from_numpy(v2r), torch.from_numpy(r2v))
    keep_v = torch.nonzero(v.norm(dim=1) > 0).flatten()
    keep_r = torch.nonzero(r.norm(dim=1) > 0).flatten()
    v2r_full = torch.full((kv,), -1, dtype=torch.int64)
    r2v_full = torch.full((kr,), -1, dtype=torch.int64)
    if keep_v.numel() == 0 or keep_r.numel() == 0:
        return PGMMatch(v2r_full, r2v_full)
    sim = v[keep_v] @ r[keep_r].T
    swapped = keep_r.numel() > keep_v.numel()
    if swapped:
        r2v, v2r = _rounds(torch.exp(-sim.T).numpy(), variant)
        sim_rows, rows_to = sim.T, r2v
    else:
        v2r, r2v = _rounds(torch.exp(-sim).numpy(), variant)
        sim_rows, rows_to = sim, v2r
    missing = np.nonzero(rows_to < 0)[0]
    if missing.size:
        rows_to[missing] = sim_rows[missing].argmax(1).numpy()
        warnings.warn(f"PGM: {missing.size} clusters had no Hungarian match ({keep_v.numel()} visible vs "
                      f"{keep_r.numel()} infrared clusters); matched to their most similar centre", stacklevel=2)
    v2r_full[keep_v] = keep_r[torch.from_numpy(v2r)]
    r2v_full[keep_r] = keep_v[torch.from_numpy(r2v)]
    return PGMMatch(v2r_full, r2v_full, swapped=swapped, fallback=int(missing.size))
