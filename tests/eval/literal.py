"""Literal per-query evaluation written from ``shared/spec/evaluation.md`` (the test oracle and benchmark peer).

One Python loop iteration per query, as in the community code; ties are ranked by gallery index (stable sort).
Returns ``(cmc_reported, cmc_standard, mAP, mINP, ap, inp)``; the SYSU reported curve is identity-de-duplicated.
Curves shorter than max_rank (tiny galleries) are padded with their last value.
"""

import numpy as np


def literal_eval(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank=20):
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    reported, standard, aps, inps = [], [], [], []
    ap_all = np.full(num_q, np.nan)
    inp_all = np.full(num_q, np.nan)
    num_valid = 0
    for q in range(num_q):
        order = indices[q]
        if protocol == "sysu":
            keep = ~((q_camids[q] == 3) & (g_camids[order] == 2))
        else:
            keep = np.ones(num_g, dtype=bool)
        ranked_pids = g_pids[order][keep]
        matches = (ranked_pids == q_pids[q]).astype(np.int64)
        seen, dedup = set(), []
        for p in ranked_pids:
            if p not in seen:
                seen.add(p)
                dedup.append(p)
        unique_curve = np.cumsum(np.array(dedup) == q_pids[q])[:max_rank]
        if len(unique_curve) < max_rank:
            unique_curve = np.concatenate([unique_curve, np.full(max_rank - len(unique_curve), unique_curve[-1])])
        if not matches.any():
            reported.append(unique_curve if protocol == "sysu" else np.zeros(max_rank))
            continue
        num_valid += 1
        cum = np.cumsum(matches)
        positions = np.nonzero(matches)[0]
        inp = cum[positions[-1]] / (positions[-1] + 1.0)
        ap = sum(cum[p] / (p + 1.0) for p in positions) / matches.sum()
        curve = np.minimum(cum, 1)[:max_rank]
        if len(curve) < max_rank:
            curve = np.concatenate([curve, np.full(max_rank - len(curve), curve[-1])])
        standard.append(curve)
        reported.append(unique_curve if protocol == "sysu" else curve)
        aps.append(ap)
        inps.append(inp)
        ap_all[q] = ap
        inp_all[q] = inp
    reported = np.sum(reported, axis=0) / num_valid
    standard = np.sum(standard, axis=0) / num_valid
    return reported, standard, float(np.mean(aps)), float(np.mean(inps)), ap_all, inp_all
