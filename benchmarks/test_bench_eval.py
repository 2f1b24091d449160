"""Evaluation benchmarks: 10 SYSU-MM01 trials and CMFP, ours vs the implementations users would otherwise run.

* ``sysu_10_trials``: 3,803 queries x 301 gallery items, 10 trials — :func:`vireid_fast.eval.evaluate` vs the
  per-query NumPy loop of the community code (written here from the spec). Target: >= 20x.
* ``cmfp``: Nv = Nr = 6,000 and 20,000, d = 2048, k = 30 — ``vireid_fast.ops.cmfp`` vs the dense four-block
  implementation (four dense similarity blocks, a full sort of every row as SALCR does, dense G @ F), each in its own
  subprocess to measure peak RSS; at 6,000 + 6,000 the median of three runs of ours against the mean of two dense
  runs, alternated. Targets: >= 10x faster and <= 1/4 of the peak RSS at 6,000 + 6,000; 20,000 + 20,000 within 8 GB
  (the dense version needs tens of GB there and is skipped).

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_eval.py --benchmark-only``. The machine may be shared:
apart from the CMFP medians, the numbers in ``extra_info`` are single measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vireid_fast.eval import evaluate_trials

NUM_Q, NUM_G, NUM_IDS, TRIALS = 3803, 301, 96, 10


def numpy_loop_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """The community per-query loop (spec: shared/spec/evaluation.md), with a stable sort for ties."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    pred_label = g_pids[indices]
    matches = (pred_label == q_pids[:, None]).astype(np.int32)
    unique_cmc, all_ap, all_inp = [], [], []
    num_valid = 0.0
    for q in range(num_q):
        order = indices[q]
        keep = np.invert((q_camids[q] == 3) & (g_camids[order] == 2))
        ranked = pred_label[q][keep]
        first = np.unique(ranked, return_index=True)[1]
        dedup = np.array([ranked[i] for i in sorted(first)])
        unique_cmc.append((dedup == q_pids[q]).astype(np.int32).cumsum()[:max_rank])
        raw = matches[q][keep]
        if not np.any(raw):
            continue
        cmc = raw.cumsum()
        last = np.max(np.where(raw == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        num_valid += 1.0
        precision = np.asarray([x / (i + 1.0) for i, x in enumerate(cmc)]) * raw
        all_ap.append(precision.sum() / raw.sum())
    curve = np.asarray(unique_cmc).astype(np.float32).sum(0) / num_valid
    return curve, np.mean(all_ap), np.mean(all_inp)


def _sysu_like_trials(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_IDS, 128)).astype(np.float32)
    q_pids = np.sort(rng.integers(0, NUM_IDS, NUM_Q))
    q_cams = rng.choice([3, 6], NUM_Q)
    q = centres[q_pids] + 1.5 * rng.standard_normal((NUM_Q, 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    trials = []
    for _ in range(TRIALS):
        g_pids = np.sort(rng.integers(0, NUM_IDS, NUM_G))
        g_cams = rng.choice([1, 2, 4, 5], NUM_G)
        g = centres[g_pids] + 1.5 * rng.standard_normal((NUM_G, 128)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        trials.append((-(q @ g.T), q_pids, g_pids, q_cams, g_cams))
    return trials


def test_sysu_10_trials(benchmark):
    trials = _sysu_like_trials()
    t0 = time.perf_counter()
    loop = [numpy_loop_eval_sysu(*t) for t in trials]
    loop_s = time.perf_counter() - t0
    summary = benchmark.pedantic(lambda: evaluate_trials(trials, protocol="sysu"), rounds=5, iterations=1)
    for res, (cmc, m_ap, m_inp) in zip(summary.results, loop, strict=True):
        np.testing.assert_allclose(res.cmc_unique, cmc, atol=1e-6)
        assert abs(res.mAP - m_ap) < 1e-9 and abs(res.mINP - m_inp) < 1e-9
    ours_s = benchmark.stats.stats.median
    benchmark.extra_info.update(numpy_loop_s=loop_s, ours_s=ours_s, speedup=loop_s / ours_s, target_speedup=20)


_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    impl, n_per, d, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    g = torch.Generator().manual_seed(0)
    # clustered features, as real embeddings are: 500 identities; generated in chunks to keep the baseline RSS low
    centres = torch.nn.functional.normalize(torch.randn(500, d, generator=g), dim=1)
    fv, fr = torch.empty(n_per, d), torch.empty(n_per, d)
    for f in (fv, fr):
        for s in range(0, n_per, 1000):
            e = min(n_per, s + 1000)
            labels = torch.randint(0, 500, (e - s,), generator=g)
            f[s:e] = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(e - s, d, generator=g), dim=1)
    def run(fv, fr):
        if impl == "ours":
            import vireid_fast
            pv, pr, _ = vireid_fast.ops.cmfp(fv, fr, k)
            return pv, pr
        def block(s):
            kth = torch.sort(s, dim=1, descending=True).values[:, k - 1:k]
            s = s * (s >= kth)
            s = s.clamp(min=0)
            return s / s.sum(1, keepdim=True)
        feats = torch.cat([fv, fr])
        top = torch.cat([block(fv @ fv.T), block(fv @ fr.T)], 1)
        bottom = torch.cat([block(fr @ fv.T), block(fr @ fr.T)], 1)
        out = torch.nn.functional.normalize(torch.cat([top, bottom]) @ feats, dim=1)
        return out[:len(fv)], out[len(fv):]

    # Warm-up on a small slice (library initialisation, thread pools, kernel selection), as a training run would be.
    run(fv[:512].contiguous(), fr[:512].contiguous())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    pv, pr = run(fv, fr)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak / 1024, "inputs_rss_mb": base / 1024,
                      "checksum": float(pv[:50].double().sum() + pr[:50].double().sum())}))
""")


def _run_worker(impl: str, n_per: int, d: int = 2048, k: int = 30) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    proc = subprocess.run([sys.executable, "-c", _WORKER, impl, str(n_per), str(d), str(k)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def test_cmfp_6000(benchmark):
    # Fresh processes, alternated (dense, ours, dense, ours, ours): on a shared machine one run can be 20% off either
    # way, so medians are compared; every run is recorded.
    dense_runs, ours_runs = [], []
    for impl in ("dense", "ours", "dense", "ours"):
        (dense_runs if impl == "dense" else ours_runs).append(_run_worker(impl, 6000))
    benchmark.pedantic(lambda: ours_runs.append(_run_worker("ours", 6000)), rounds=1, iterations=1)
    # Medians: of three runs for ours, of two (their mean) for the dense version; peak RSS is the largest seen.
    dense = dict(max(dense_runs, key=lambda r: r["peak_rss_mb"]),
                 seconds=sum(r["seconds"] for r in dense_runs) / len(dense_runs))
    ours = dict(max(ours_runs, key=lambda r: r["peak_rss_mb"]), seconds=_median_run(ours_runs)["seconds"])
    assert all(abs(r["checksum"] - dense_runs[0]["checksum"]) < 1e-3 for r in ours_runs + dense_runs)
    benchmark.extra_info.update(
        ours_runs_s=[round(r["seconds"], 3) for r in ours_runs],
        dense_runs_s=[round(r["seconds"], 3) for r in dense_runs],
        ours_s=ours["seconds"], dense_s=dense["seconds"], speedup=dense["seconds"] / ours["seconds"],
        ours_peak_rss_mb=ours["peak_rss_mb"], dense_peak_rss_mb=dense["peak_rss_mb"],
        rss_ratio=ours["peak_rss_mb"] / dense["peak_rss_mb"], baseline_rss_mb=ours["inputs_rss_mb"],
        ours_extra_rss_mb=ours["peak_rss_mb"] - ours["inputs_rss_mb"],
        dense_extra_rss_mb=dense["peak_rss_mb"] - dense["inputs_rss_mb"],
        extra_rss_ratio=(ours["peak_rss_mb"] - ours["inputs_rss_mb"]) / (dense["peak_rss_mb"] - dense["inputs_rss_mb"]),
        target_speedup=10, target_rss_ratio=0.25)


@pytest.mark.skipif(os.environ.get("VIREID_BENCH_LARGE", "1") == "0", reason="VIREID_BENCH_LARGE=0")
def test_cmfp_20000(benchmark):
    ours = benchmark.pedantic(lambda: _run_worker("ours", 20000), rounds=1, iterations=1)
    benchmark.extra_info.update(ours_s=ours["seconds"], ours_peak_rss_mb=ours["peak_rss_mb"], target_peak_rss_mb=8192,
                                baseline_rss_mb=ours["inputs_rss_mb"],
                                dense="skipped: four dense 20,000^2 blocks plus G need > 24 GB")
    assert ours["peak_rss_mb"] < 8192
