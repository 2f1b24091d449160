"""SALCR per-epoch steps outside the network at SYSU-MM01 size, with peak memory (and one iteration's GPCR sets).

Features: ``benchmarks.epoch_steps.identity_features`` (395 identities, N_v = 22,258 visible and N_r = 11,909
infrared, d = 2,048, a modality offset per modality). Steps, each in its own subprocess (this file run as
a script) so its peak RSS is its own:

* ``cluster``: per-modality k-reciprocal Jaccard (k1 30, k2 6, sparse) + DBSCAN (eps 0.6, min_samples 4);
* ``associate``: DAGL on the identity labels (:func:`vireid_fast.methods.salcr.dagl_associate`): CMFP(tr) k = 30
  (sparse op), unnormalised centres, Sinkhorn with the community stop rule both ways (N_v x K^r and N_r x K^v plans),
  refinement; reports the fraction of instances whose cross label is their identity's cluster;
* ``memory``: the 4 + 6 Np = 22 banks of :meth:`SALCR.build_memories` from ĝ and pg ((Np + 1) d = 8,192 wide; the
  pg features themselves, 1.1 GB at this size, are the extraction's and counted in ``rss_before_mb``);
* ``gpcr_sets``: one iteration's GPCR positive sets at the code's batch (S = 64 pairs: 3S globals, 9S part rows per
  part, Np = 3) — top-(k+1) per row against the instance banks, batch x N boolean masks.

No step holds an N x N or N_v x N_r matrix. ``VIREID_BENCH_SALCR_SCALE`` (default 1) scales N_v and N_r. Run:
``.venv/bin/python -m pytest benchmarks/test_bench_salcr.py --benchmark-only -s``.
"""

from __future__ import annotations

import time

import pytest

from benchmarks.epoch_steps import DIM, identity_features, peak_rss_mb, time_step, worker_main

NUM_PARTS = 3


def _method(num_parts: int):
    from types import SimpleNamespace

    import torch

    from vireid_fast.config import load_config
    from vireid_fast.methods.salcr import SALCR

    config = load_config(None, ["method.name=salcr", f"method.num_parts={num_parts}"])
    encoder = SimpleNamespace(feature_dim=DIM)
    context = SimpleNamespace(encoder=encoder, world=1, seed=0, device=torch.device("cpu"), config=config)
    return SALCR(config.method, context)


def _worker(step: str, nv: int, nr: int) -> dict:
    import torch
    import torch.nn.functional as F

    from vireid_fast.methods import jaccard_dbscan
    from vireid_fast.methods.salcr import FAMILIES, dagl_associate, top_k_from_scores, top_k_mask
    from vireid_fast.modality import INFRARED, VISIBLE

    (fv, pv), (fr, pr) = identity_features(nv, nr)
    keep_v, keep_r = pv >= 0, pr >= 0
    info: dict = {"step": step, "nv": nv, "nr": nr, "dim": DIM, "threads": torch.get_num_threads()}
    if step == "memory":
        g = torch.Generator().manual_seed(1)
        pg = {m: F.normalize(torch.randn(n, (NUM_PARTS + 1) * DIM, generator=g), dim=1) for m, n in
              ((VISIBLE, nv), (INFRARED, nr))}
    info["rss_before_mb"] = peak_rss_mb()
    start = time.perf_counter()
    if step == "cluster":
        labels = [jaccard_dbscan(f, k1=30, k2=6, eps=0.6, min_samples=4) for f in (fv, fr)]
        info["clusters"] = [int(lab.max()) + 1 for lab in labels]
    elif step == "associate":
        out = dagl_associate(fv[keep_v], fr[keep_r], pv[keep_v], pr[keep_r], cmfp_k=30)
        info["cross_accuracy_visible"] = float((out["cross_v"] == pv[keep_v]).float().mean())
        info["cross_accuracy_infrared"] = float((out["cross_r"] == pr[keep_r]).float().mean())
        info["clusters"] = [out["centres_v"].shape[0], out["centres_r"].shape[0]]
    elif step == "memory":
        method = _method(NUM_PARTS)
        method.start_epoch(method.params.stage1_epochs)
        method.raw_labels = {VISIBLE: pv, INFRARED: pr}
        features = {VISIBLE: {"feature": fv, "pg": pg[VISIBLE]}, INFRARED: {"feature": fr, "pg": pg[INFRARED]}}
        method.build_memories(features, {VISIBLE: pv, INFRARED: pr})
        info["banks"] = 4 + 6 * NUM_PARTS
        info["instance_visible_shape"] = list(method.instance_vp.shape)
    elif step == "gpcr_sets":
        s, k = 64, 30
        g = torch.Generator().manual_seed(2)
        banks = {VISIBLE: fv[keep_v].contiguous(), INFRARED: fr[keep_r].contiguous()}
        part_banks = {m: F.normalize(torch.randn(NUM_PARTS, b.shape[0], DIM, generator=g), dim=2)
                      for m, b in banks.items()}
        info["rss_before_mb"] = peak_rss_mb()
        start = time.perf_counter()
        glob = torch.randn(3 * s, DIM, generator=g)
        rows = torch.randn(9 * s, DIM, generator=g)
        slot = {key: i for i, key in enumerate(FAMILIES)}
        sizes = []
        for m in (VISIBLE, INFRARED):  # as SALCR.gpcr_global_loss / gpcr_part_loss
            near_g = top_k_mask(glob, banks[m], k).view(3, s, -1)
            sizes.append(int((near_g[0] & near_g[1] & near_g[2]).sum()))
            for part in range(NUM_PARTS):
                logits = F.normalize(rows, dim=1) @ part_banks[m][part].t() / 0.05
                near = top_k_from_scores(logits, k).view(9, s, -1)
                for mm, q in FAMILIES:
                    o1, o2 = (o for o in "var" if o != mm)
                    sizes.append(int((near_g["var".index(q)] & (near[slot[(o1, q)]] | near[slot[(o2, q)]])).sum()))
        info["positives_total"] = sum(sizes)
    else:
        raise ValueError(step)
    info["step_seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = peak_rss_mb()
    return info


@pytest.mark.parametrize("step", ["cluster", "associate", "memory", "gpcr_sets"])
def test_salcr_epoch_steps(benchmark, step):
    info, nv, nr = time_step(benchmark, __file__, step, "VIREID_BENCH_SALCR_SCALE")
    dense_mb = nv * nr * 4 / 2**20
    print(f"\n{step:10s} {nv}+{nr}  {info['step_seconds']:8.2f} s  peak RSS {info['peak_rss_mb']:8.1f} MB "
          f"(inputs {info['rss_before_mb']:.1f} MB; one dense N_v x N_r float32 matrix: {dense_mb:.0f} MB)  {info}")
    # no dense N_v x N_r: the step's own growth stays below one such matrix (loose bound at reduced scale), plus,
    # for the memories, the banks themselves ((2 + 2 Np) instance banks of N x d)
    banks_mb = (2 + 2 * NUM_PARTS) * (nv + nr) / 2 * DIM * 4 / 2**20 if step == "memory" else 0.0
    assert info["peak_rss_mb"] - info["rss_before_mb"] < banks_mb + max(dense_mb, 1024)


if __name__ == "__main__":
    worker_main(_worker)
