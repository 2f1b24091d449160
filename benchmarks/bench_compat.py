"""Compat drop-ins vs a literal implementation of the community code, timed in one run, interleaved.

Run: ``OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python -m benchmarks.bench_compat``. Prints a markdown table (the
numbers in docs/compat.md). The "community" side is written here from the repositories' facts at their own level of
vectorisation: faiss ``IndexFlatL2`` search (faiss-cpu) and per-row numpy loops for the Jaccard distance; per-sample
Python update loops in the memories' backward; a dense ``argsort`` for HIL's ranked list.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from tests.compat import literal
from vireid_fast.compat import clustercontrast, hil, mult, pclhd


def community_jaccard(x: np.ndarray, k1: int, k2: int, mat_type=np.float32) -> np.ndarray:
    """The community function's steps and loops (faiss search, per-row numpy), float32."""
    import faiss

    n = x.shape[0]
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, rank = index.search(x, k1)

    def recip(i, k):
        fwd = rank[i, :k + 1]
        back = rank[fwd, :k + 1]
        return fwd[np.where(back == i)[0]]

    half = int(np.around(k1 / 2))
    near = [recip(i, k1) for i in range(n)]
    near_half = [recip(i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=mat_type)
    xt = torch.from_numpy(x)
    for i in range(n):
        exp = near[i]
        for c in near[i]:
            cand = near_half[c]
            if len(np.intersect1d(cand, near[i])) > 2 / 3 * len(cand):
                exp = np.append(exp, cand)
        exp = np.unique(exp)
        dist = 2 - 2 * torch.mm(xt[i][None], xt[exp].t())
        v[i, exp] = F.softmax(-dist, dim=1).view(-1).numpy().astype(mat_type)
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)]).astype(mat_type)
    inv = [np.where(v[:, i] != 0)[0] for i in range(n)]
    out = np.zeros((n, n), dtype=mat_type)
    for i in range(n):
        acc = np.zeros((1, n), dtype=mat_type)
        nz = np.where(v[i] != 0)[0]
        for j in nz:
            acc[0, inv[j]] += np.minimum(v[i, j], v[inv[j], j])
        out[i] = 1 - acc / (2 - acc)
    out[out < 0] = 0
    return out


def pair(community, ours, repeat=3):
    """Best-of-``repeat`` seconds of each, the two alternated so that both see the same machine load."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for slot, fn in enumerate((community, ours)):
            t0 = time.perf_counter()
            fn()
            best[slot] = min(best[slot], time.perf_counter() - t0)
    return best


def memory_step(module_call, literal_call, b, c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    t = torch.randint(0, c, (b,), generator=g)
    centres = F.normalize(torch.randn(c, d, generator=g), dim=1)

    def ours():
        module_call(x.clone().requires_grad_(), t, centres).backward()

    def lit():
        literal_call(x.clone().requires_grad_(), t, centres.clone()).backward()
    return ours, lit


def main() -> None:
    rows = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    g = np.random.default_rng(0)
    for n in (477, 3000):
        centres = g.normal(size=(n // 10, 2048))
        x = centres[g.integers(0, len(centres), n)] + g.normal(size=(n, 2048))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        xt = torch.from_numpy(x)
        rep = 3 if n < 1000 else 1
        t_c, t_o = pair(lambda x=x: community_jaccard(x, 30, 6),
                        lambda xt=xt: clustercontrast.compute_jaccard_distance(xt, k1=30, k2=6, print_flag=False), rep)
        rows.append((f"compute_jaccard_distance N={n}, d=2048, k1=30, k2=6", t_c, t_o))

    def cc_memory(x, t, centres):
        m = clustercontrast.ClusterMemory(2048, centres.shape[0], temp=0.05, momentum=0.1)
        m.features = centres.clone()
        return m(x, t)
    ours, lit = memory_step(cc_memory, lambda x, t, m: literal.cluster_loss(x, t, m, 0.05, 0.1), 256, 500, 2048)
    rows.append(("ClusterMemory fwd+bwd B=256, C=500, D=2048 (cluster-contrast/ADCA/PGM/HIL)", *pair(lit, ours, 15)))

    def hybrid(x, t, centres):
        m = pclhd.ClusterMemory(2048, centres.shape[0], mode="CMhybrid")
        m.features = centres.repeat(2, 1)
        return m(x, t)

    def hybrid_lit(x, t, m):
        mean, hard = torch.chunk(literal.cm(x, t, m.repeat(2, 1), 0.2, "hybrid") / 0.05, 2, dim=1)
        return 0.5 * (F.cross_entropy(hard, t) + torch.relu(F.cross_entropy(mean, t) - 0.2))
    ours, lit = memory_step(hybrid, hybrid_lit, 256, 500, 2048)
    rows.append(("PCLHD ClusterMemory(mode='CMhybrid') fwd+bwd, same sizes", *pair(lit, ours, 15)))

    def logits_mem(x, t, centres):
        m = mult.ClusterMemory(2048, centres.shape[0])
        m.features = centres.clone()
        return F.cross_entropy(m(x, t), t)
    ours, lit = memory_step(logits_mem, lambda x, t, m: F.cross_entropy(literal.cm(x, t, m, 0.2) / 0.05, t), 256,
                            500, 2048)
    rows.append(("MULT/SALCR ClusterMemory (logits) fwd+bwd, same sizes", *pair(lit, ours, 15)))

    f = F.normalize(torch.randn(8000, 768), dim=1)
    rows.append(("HIL compute_ranked_list N=8000, d=768, k=20",
                 *pair(lambda: np.argsort((1 - f.mm(f.t())).numpy(), axis=1)[:, 1:21],
                       lambda: hil.compute_ranked_list(f, k=20, verbose=False), 2)))

    print(f"CPU: {cpu}; torch threads: {torch.get_num_threads()}\n")
    print("| step | community-style literal (s) | compat (s) | speed-up |\n|---|---|---|---|")
    for name, t_c, t_o in rows:
        print(f"| {name} | {t_c:.3f} | {t_o:.3f} | {t_c / t_o:.1f}x |")


if __name__ == "__main__":
    main()
