"""Drop-in replacements for the AGW/CAJ evaluation functions copied into ADCA, PGM, PCLHD, HIL, SALCR and OTLA.

Same signatures and outputs (numpy in, numpy out): ``(cmc, mAP, mINP)`` with ``cmc`` float32 of length ``max_rank``
(capped at the gallery size) and ``mAP``/``mINP`` numpy float64 scalars. Computed by the vectorised
:func:`vireid_fast.eval.evaluate`.

Differences, all where the community code has no usable answer:

* ties in distance are ranked by gallery index (NumPy's default quicksort orders them arbitrarily);
* when no query has a true match, ValueError (the community code fails an assertion / returns NaN with warnings);
* ``eval_sysu``: when some query's de-duplicated identity list is shorter than ``max_rank`` the community code builds
  a ragged array and fails; here every curve is padded with its last value and the result has the length of the
  longest one (identical to the community output whenever that code runs).
"""

from __future__ import annotations

import numpy as np

from ..eval.metrics import evaluate, hit_counts

__all__ = ["eval_regdb", "eval_sysu"]


def _float32_curve(counts: np.ndarray, num_valid: int) -> np.ndarray:
    # The community code sums float32 0/1 curves (exact integers) and divides by a Python float.
    return counts.astype(np.float32) / np.float32(num_valid)


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """SYSU-MM01 evaluation: camera 3 queries ignore camera 2 gallery items; identity-de-duplicated CMC.

    Args:
        distmat: (num_q, num_g) distances; q_pids, g_pids, q_camids, g_camids: integer arrays.
    Returns:
        ``(cmc, mAP, mINP)``: cmc (min(max_rank, num_g),) float32 (or shorter, see the module note), np.float64 x2.
    """
    res = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, protocol="sysu", max_rank=max_rank)
    length = int(min(res.max_rank, res.num_unique.max()))
    cmc = _float32_curve(hit_counts(res, unique=True), res.num_valid)[:length]
    return cmc, np.float64(res.mAP), np.float64(res.mINP)


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
    """RegDB evaluation: nothing removed, standard CMC (clipped cumulative matches averaged over valid queries).

    Returns:
        ``(cmc, mAP, mINP)``: cmc (min(max_rank, num_g),) float32, np.float64 x2.
    """
    res = evaluate(distmat, q_pids, g_pids, protocol="regdb", max_rank=max_rank)
    cmc = _float32_curve(hit_counts(res, unique=False), res.num_valid)
    return cmc, np.float64(res.mAP), np.float64(res.mINP)
