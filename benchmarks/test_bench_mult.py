"""MULT per-epoch steps outside the network at SYSU-MM01 size, with peak memory.

Identity-structured random features of :func:`benchmarks.epoch_steps.identity_features` (395 identities,
N_v = 22,258 visible and N_r = 11,909 infrared unit vectors of d = 2,048). Steps, each in its own subprocess (this
file run as a script) so its peak RSS is its own:

* ``cluster``: per-modality sparse k-reciprocal Jaccard (k1 30, k2 6) + DBSCAN (eps 0.6, min_samples 4), the
  distances kept;
* ``association``: on the true identities as the DBSCAN labels (so the step does not depend on the clustering's
  result): raw centroids, the sparse homogeneous affinities, the two centroid OTs (community stop), the instance OT
  (community stop, streamed in row blocks) and the two label transfers (Gauss-Seidel, cap 20), each timed;
* ``memory``: the six memories from the normalised centroids and the four soft-label matrices;
* ``sweep``: the unit of the instance OT's cost — three Sinkhorn steps (one pass over the cost blocks each) and one
  transfer product pair (H_vr Y, H_rv Y with K = 400), streamed (cost recomputed per block) and, when
  ``VIREID_BENCH_MULT_CACHE_MB`` allows, with the cached float32 cost. The whole instance OT costs the number of
  Sinkhorn steps (``association``: 11..500, community stop) times one step.

Nothing N_v x N_r or N x N is held: the Jaccard distance and the homogeneous affinity are sparse, the instance OT keeps
only its potentials (N_v + N_r float64) and one (rows, N_r) float64 block at a time (64 MB; the float32 cost is cached
only while it fits in 256 MB, i.e. not at SYSU size), the label matrices are N x K. ``VIREID_BENCH_MULT_SCALE``
(default 1) scales N_v and N_r; at SYSU size the instance OT costs one N_v x N_r x d product per Sinkhorn step on the
CPU. Run: ``.venv/bin/python -m pytest benchmarks/test_bench_mult.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.epoch_steps import DIM, identity_features, peak_rss_mb, time_step, worker_main


def _worker(step: str, nv: int, nr: int) -> dict:
    import torch

    import vireid_fast  # noqa: F401
    from vireid_fast.methods import cluster_means
    from vireid_fast.methods.mult_transfer import (
        HeteroAffinity,
        _cross_init,
        homogeneous_affinity,
        propagate,
        raw_centroids,
        soft_labels,
    )
    from vireid_fast.ops import dbscan, kreciprocal_jaccard

    (fv, pv), (fr, pr) = identity_features(nv, nr)
    info: dict = {"step": step, "nv": nv, "nr": nr, "dim": DIM, "threads": torch.get_num_threads(),
                  "rss_before_mb": peak_rss_mb()}
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    start = time.perf_counter()
    if step == "cluster":
        for name, f in (("visible", fv), ("infrared", fr)):
            dist = timed(f"jaccard_{name}", lambda f=f: kreciprocal_jaccard(f, k1=30, k2=6, sparse=True))
            labels = timed(f"dbscan_{name}", lambda dist=dist: dbscan(dist, 0.6, 4))
            info[f"clusters_{name}"] = int(labels.max()) + 1
            info[f"jaccard_nnz_{name}"] = int(dist.vals.numel())
    elif step == "association":
        keep_v, keep_r = pv >= 0, pr >= 0  # identities of one modality only: outliers here
        cv, cr = raw_centroids(fv, pv), raw_centroids(fr, pr)
        info["clusters"] = [cv.shape[0], cr.shape[0]]
        info["outliers"] = [int((~keep_v).sum()), int((~keep_r).sum())]
        a = {}
        for name, f in (("visible", fv), ("infrared", fr)):
            dist = timed(f"jaccard_{name}", lambda f=f: kreciprocal_jaccard(f, k1=30, k2=6, sparse=True))
            a[name] = timed(f"homogeneous_{name}", lambda dist=dist: homogeneous_affinity(dist))
            del dist
        ot_info: dict = {}
        y_v0 = torch.softmax(fv @ cv.t() / 0.05, dim=1)
        y_r0 = torch.softmax(fr @ cr.t() / 0.05, dim=1)
        yh_r0 = timed("ot_centroids_r_to_v", lambda: _cross_init(fr, cv, 25.0, "community", 500, 0.1, "onehot",
                                                                 ot_info, "r_to_cv"))
        yh_v0 = timed("ot_centroids_v_to_r", lambda: _cross_init(fv, cr, 25.0, "community", 500, 0.1, "onehot",
                                                                 ot_info, "v_to_cr"))
        hetero = timed("ot_instances", lambda: HeteroAffinity(fv, fr, 25.0).solve(stop="community"))
        ot_info["instances"] = hetero.n_iter
        info["ot_steps"] = ot_info
        info["instance_ot_cached"] = hetero._cache is not None
        info["instance_ot_block_rows"] = hetero.rows
        y_v, yh_r, it_v, _ = timed("transfer_v_space", lambda: propagate(y_v0, yh_r0, a["visible"], a["infrared"],
                                                                        hetero.vr, hetero.rv, alpha=0.2))
        y_r, yh_v, it_r, _ = timed("transfer_r_space", lambda: propagate(y_r0, yh_v0, a["infrared"], a["visible"],
                                                                        hetero.rv, hetero.vr, alpha=0.2))
        info["transfer_iterations"] = [it_v, it_r]
        # how often the transferred intra / cross label is the true identity (true clusters as the DBSCAN labels)
        info["intra_acc"] = [float((y_v.argmax(1) == pv)[keep_v].float().mean()),
                             float((y_r.argmax(1) == pr)[keep_r].float().mean())]
        info["cross_acc"] = [float((yh_v.argmax(1) == pv)[keep_v & (pv < cr.shape[0])].float().mean()),
                             float((yh_r.argmax(1) == pr)[keep_r & (pr < cv.shape[0])].float().mean())]
    elif step == "memory":
        centres = [cluster_means(f, p) for f, p in ((fv, pv), (fr, pr))]
        memories = [c.clone() for c in centres for _ in range(3)]
        k = [c.shape[0] for c in centres]
        for n, kk in ((nv, k[0]), (nv, k[1]), (nr, k[1]), (nr, k[0])):
            soft_labels(torch.softmax(torch.randn(n, kk), dim=1), 0.7)
        info["memory_rows"] = [m.shape[0] for m in memories]
    elif step == "sweep":
        cache_mb = int(os.environ.get("VIREID_BENCH_MULT_CACHE_MB", "0"))
        ot = HeteroAffinity(fv, fr, 25.0, cache_bytes=cache_mb << 20)
        info["instance_ot_cached"] = ot._cache is not None
        info["instance_ot_block_rows"] = ot.rows
        if ot._cache is not None:
            timed("fill_cache", lambda: ot._sweep(ot.g))
        timed("three_sinkhorn_steps", lambda: ot.solve(stop="community", max_iter=3))
        labels = torch.softmax(torch.randn(nr, 400), dim=1)
        timed("transfer_products", lambda: (ot.vr(labels), ot.rv(torch.softmax(torch.randn(nv, 400), dim=1))))
    else:
        raise ValueError(step)
    info["timings"] = timings
    info["step_seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = peak_rss_mb()
    return info


@pytest.mark.parametrize("step", ["cluster", "association", "memory", "sweep"])
def test_mult_epoch_steps(benchmark, step):
    info, nv, nr = time_step(benchmark, __file__, step, "VIREID_BENCH_MULT_SCALE", timeout=4 * 3600)
    dense_vr_mb = nv * nr * 4 / 2**20
    print(f"\n{step:12s} {nv}+{nr}  {info['step_seconds']:8.2f} s  peak RSS {info['peak_rss_mb']:8.1f} MB "
          f"(features alone {info['rss_before_mb']:.1f} MB; one N_v x N_r float32 matrix: {dense_vr_mb:.0f} MB)"
          f"  {info}")
    # no N_v x N_r or N x N matrix: at SYSU size the step's own growth stays below one N_v x N_r float32 matrix (at a
    # reduced scale fixed costs and the allowed cost cache dominate, so only a loose bound applies)
    assert info["peak_rss_mb"] - info["rss_before_mb"] < max(dense_vr_mb, 1024)


if __name__ == "__main__":
    worker_main(_worker)
