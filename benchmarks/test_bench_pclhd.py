"""PCLHD / SWPCL per-epoch steps outside the network at SYSU-MM01 size, with peak memory.

Identity-structured random features: 395 training identities (SYSU-MM01's), N_v = 22,258 visible and N_r = 11,909
infrared unit vectors of d = 2,048, each ``normalize(centre_id + sigma * noise)`` (a modality offset shared by the
modality's rows, so the two modalities are not trivially mixed). Steps, each in its own subprocess (this file run as
a script) so its peak RSS is its own:

* ``cluster``: per-modality k-reciprocal Jaccard (k1 30, k2 6, sparse) + DBSCAN (eps 0.6, min_samples 4), both
  modalities;
* ``cluster_all``: the all-modality clustering on [visible ; infrared] with the modality-invariant Jaccard (k1 40,
  k2 32);
* ``pgm``: cluster centres of both modalities and PGM matching (cost matrix K_v x K_r over clusters, not samples);
* ``memory``: PCLHD hybrid banks, dynamic banks (M = 16), the all-modality bank and lists, SWPCL soft banks (K = 4).

No step holds an N x N or N_v x N_r matrix: the Jaccard distance is sparse (CSR, about k1..k1 + k2 entries per row),
PGM works on K_v x K_r cluster centres, banks are C x D. ``VIREID_BENCH_PCLHD_SCALE`` (default 1) scales N_v and N_r
for a quick run. Run: ``.venv/bin/python -m pytest benchmarks/test_bench_pclhd.py --benchmark-only -s``.
"""

from __future__ import annotations

import time

import pytest

from benchmarks.epoch_steps import DIM, identity_features, peak_rss_mb, time_step, worker_main


def _worker(step: str, nv: int, nr: int) -> dict:
    import torch

    import vireid_fast  # noqa: F401
    from vireid_fast.memory import SoftPrototypeMemory
    from vireid_fast.methods import cluster_means, jaccard_dbscan
    from vireid_fast.methods.pclhd import all_modality_bank, draw_dynamic_rows
    from vireid_fast.methods.pgm import cluster_centres, pgm_match

    (fv, pv), (fr, pr) = identity_features(nv, nr)
    info: dict = {"step": step, "nv": nv, "nr": nr, "dim": DIM, "threads": torch.get_num_threads(),
                  "rss_before_mb": peak_rss_mb()}
    start = time.perf_counter()
    if step == "cluster":
        labels = [jaccard_dbscan(f, k1=30, k2=6, eps=0.6, min_samples=4) for f in (fv, fr)]
        info["clusters"] = [int(lab.max()) + 1 for lab in labels]
    elif step == "cluster_all":
        joint = torch.cat([fv, fr])
        modality = torch.cat([torch.zeros(nv, dtype=torch.int64), torch.ones(nr, dtype=torch.int64)])
        labels = jaccard_dbscan(joint, k1=40, k2=32, eps=0.6, min_samples=4, modality=modality)
        info["clusters"] = int(labels.max()) + 1
    elif step == "pgm":
        centres = [cluster_centres(f, p)[0] for f, p in ((fv, pv), (fr, pr))]
        match = pgm_match(centres[0], centres[1])
        info["matched_true"] = float((match.visible_to_infrared == torch.arange(centres[0].shape[0])).float().mean())
        info["clusters"] = [centres[0].shape[0], centres[1].shape[0]]
    elif step == "memory":
        g = torch.Generator().manual_seed(0)
        for f, p in ((fv, pv), (fr, pr)):
            centres = cluster_means(f, p)
            hybrid = torch.cat([centres, centres])
            rows = draw_dynamic_rows(p, centres.shape[0], 16, g)
            dynamic = torch.nn.functional.normalize(f[rows], dim=1)
            soft = SoftPrototypeMemory(DIM, num_prototypes=4)
            soft.build(f, p)
            del hybrid, dynamic, soft
        joint_labels = torch.cat([pv, pr])
        centre, both = all_modality_bank(fv, fr, joint_labels)
        info["all_clusters"] = int(both.sum())
    else:
        raise ValueError(step)
    info["step_seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = peak_rss_mb()
    return info


@pytest.mark.parametrize("step", ["cluster", "cluster_all", "pgm", "memory"])
def test_pclhd_epoch_steps(benchmark, step):
    info, nv, nr = time_step(benchmark, __file__, step, "VIREID_BENCH_PCLHD_SCALE")
    dense_mb = (nv + nr) ** 2 * 4 / 2**20
    print(f"\n{step:12s} {nv}+{nr}  {info['step_seconds']:8.2f} s  peak RSS {info['peak_rss_mb']:8.1f} MB "
          f"(features alone {info['rss_before_mb']:.1f} MB; one dense (N_v+N_r)^2 float32 matrix: {dense_mb:.0f} MB)"
          f"  {info}")
    # no dense N x N: at SYSU size the step's own growth stays far below one dense matrix of the joint size (at a
    # reduced scale fixed costs dominate, so only a loose bound applies)
    assert info["peak_rss_mb"] - info["rss_before_mb"] < max(dense_mb / 2, 1024)


if __name__ == "__main__":
    worker_main(_worker)
