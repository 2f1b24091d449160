"""HIL per-epoch steps outside the network at SYSU-MM01 size, with peak memory.

Identity-structured random features (:func:`benchmarks.epoch_steps.identity_features`: 395 identities,
N_v = 22,258 visible and N_r = 11,909 infrared rows of d = 2,048; the deep f and the shallow g are two independent
draws, scaled by 45 ≈ √D like un-normalised BNNeck outputs), labels = the identities present in both modalities
(as BRST's unified clusters). Steps, each in its own subprocess (this file run as a script) so its peak RSS is its own:

* ``brst``: IR prototypes of [f ; g] (2 D = 4,096) and the visible relabelling (row blocks of 4,096 x M_r);
* ``memory``: instance memories (4 x N x D), the shared cluster memories of both branches (C x D);
* ``subcentres``: SubCentres of both branches, K = 9, n_init = 10 (the batched K-means over every cluster);
* ``subcentres_sklearn``: the same with ``sklearn.cluster.KMeans(9, random_state=0, n_init=10)`` per cluster, on the
  first ``VIREID_BENCH_HIL_SKLEARN_CLUSTERS`` (default 40) clusters of the deep branch; the step reports the measured
  seconds per cluster and the extrapolation to every cluster of both branches.

No step holds an N x N or N_v x N_r matrix: BRST holds a 4,096 x M_r block, K-means a padded block of at most 2^24
elements per initialisation set. ``VIREID_BENCH_HIL_SCALE`` (default 1) scales N_v and N_r.
Run: ``.venv/bin/python -m pytest benchmarks/test_bench_hil.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.epoch_steps import DIM, identity_features, peak_rss_mb, time_step, worker_main

SCALE_RAW = 45.0


def _worker(step: str, nv: int, nr: int) -> dict:
    import torch

    import vireid_fast  # noqa: F401
    from vireid_fast.methods.hil import brst, pooled_means, sub_centres

    (fv, pv), (fr, pr) = identity_features(nv, nr, seed=0)
    (gv, _), (gr, _) = identity_features(nv, nr, seed=0)
    gv = gv + 0.5 * torch.nn.functional.normalize(torch.randn_like(gv), dim=1)
    gr = gr + 0.5 * torch.nn.functional.normalize(torch.randn_like(gr), dim=1)
    fv, fr, gv, gr = (SCALE_RAW * t for t in (fv, fr, gv, gr))
    labels = torch.cat([pv, pr])
    num = int(labels.max()) + 1
    info: dict = {"step": step, "nv": nv, "nr": nr, "dim": DIM, "clusters": num, "threads": torch.get_num_threads(),
                  "rss_before_mb": peak_rss_mb()}
    start = time.perf_counter()
    if step == "brst":
        xr = torch.cat([fr, gr], 1)
        proto = torch.zeros(num, 2 * DIM, dtype=torch.float64).index_add_(0, pr[pr >= 0], xr[pr >= 0].double())
        proto /= torch.bincount(pr[pr >= 0], minlength=num).clamp(min=1).double()[:, None]
        out = brst(torch.cat([fv, gv], 1), pv, proto, 0.5)
        info["kept"] = int((out >= 0).sum())
        info["kept_correct"] = float((out[out >= 0] == pv[out >= 0]).float().mean())
    elif step == "memory":
        inst = [torch.nn.functional.normalize(t, dim=1).contiguous() for t in (fv, fr, gv, gr)]
        shared = [pooled_means(torch.cat(pair), labels, num) for pair in ((fv, fr), (gv, gr))]
        info["instance_mb"] = sum(t.numel() * 4 for t in inst) / 2**20
        info["shared_shape"] = list(shared[0].shape)
    elif step == "subcentres":
        times = []
        for pair in ((fv, fr), (gv, gr)):
            t0 = time.perf_counter()
            u = sub_centres(torch.cat(pair), labels, num, 9)
            times.append(time.perf_counter() - t0)
        info["branch_seconds"] = times
        info["shape"] = list(u.shape)
    elif step == "subcentres_sklearn":
        import warnings

        from sklearn.cluster import KMeans

        feats = torch.cat([fv, fr]).numpy()
        lab = labels.numpy()
        count = min(num, int(os.environ.get("VIREID_BENCH_HIL_SKLEARN_CLUSTERS", "40")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c in range(count):
                members = feats[lab == c]
                if members.shape[0] > 9:
                    KMeans(9, random_state=0, n_init=10).fit(members)
        per_cluster = (time.perf_counter() - start) / count
        info["clusters_run"] = count
        info["seconds_per_cluster"] = per_cluster
        info["extrapolated_both_branches_s"] = per_cluster * num * 2
    else:
        raise ValueError(step)
    info["step_seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = peak_rss_mb()
    return info


@pytest.mark.parametrize("step", ["brst", "memory", "subcentres", "subcentres_sklearn"])
def test_hil_epoch_steps(benchmark, step):
    if step == "subcentres_sklearn":
        pytest.importorskip("sklearn")
    info, nv, nr = time_step(benchmark, __file__, step, "VIREID_BENCH_HIL_SCALE")
    dense_mb = (nv + nr) ** 2 * 4 / 2**20
    print(f"\n{step:18s} {nv}+{nr}  {info['step_seconds']:8.2f} s  peak RSS {info['peak_rss_mb']:8.1f} MB "
          f"(features alone {info['rss_before_mb']:.1f} MB; one dense (N_v+N_r)^2 float32 matrix: {dense_mb:.0f} MB)"
          f"  {info}")
    assert info["peak_rss_mb"] - info["rss_before_mb"] < max(dense_mb / 2, 1024)


if __name__ == "__main__":
    worker_main(_worker)
