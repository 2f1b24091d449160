"""Shared plumbing of the per-epoch step benchmarks at SYSU-MM01 size (test_bench_{pclhd,hil,mult,salcr}.py).

Each benchmark file is also a script: ``python <file> <step> <N_v> <N_r>`` runs one step in a fresh process (so its
peak RSS is its own) and prints a JSON line; :func:`time_step` launches it once under pytest-benchmark.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

NV, NR, DIM, IDS = 22258, 11909, 2048, 395  # SYSU-MM01's training images per modality, ResNet-50's d, identities
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def identity_features(nv: int, nr: int, dim: int = DIM, ids: int = IDS, sigma: float = 0.9, seed: int = 0):
    """(visible (nv, dim), infrared (nr, dim)) float32 unit rows ``normalize(centre_id + offset_m + sigma * noise)``
    and their (nv,), (nr,) identity labels, numbered densely over the identities present in both modalities (-1 for
    the others, as DBSCAN numbers clusters)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, dim, generator=g) / dim ** 0.5
    out = []
    for count in (nv, nr):
        offset = 0.3 * torch.randn(dim, generator=g) / dim ** 0.5
        pid = torch.randint(0, ids, (count,), generator=g)
        x = centres[pid] + offset + sigma * torch.randn(count, dim, generator=g) / dim ** 0.5
        out.append((torch.nn.functional.normalize(x, dim=1), pid))
    shared = torch.tensor(sorted(set(out[0][1].tolist()) & set(out[1][1].tolist())))
    dense = torch.full((ids,), -1, dtype=torch.int64)
    dense[shared] = torch.arange(shared.numel())
    return [(f, dense[p]) for f, p in out]


def run_step(script: str, step: str, nv: int, nr: int, timeout: float = 7200) -> dict:
    """Run ``script``'s ``step`` at size (nv, nr) in its own process (the repository on its path); its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(script), step, str(nv), str(nr)], capture_output=True,
                          text=True, check=False, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step {step} ({nv} + {nr}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_step(benchmark, script: str, step: str, scale_env: str, timeout: float = 7200) -> tuple[dict, int, int]:
    """One round of ``step`` at SYSU-MM01 size times ``$scale_env`` (default 1; at least 50 rows per modality),
    recorded in pytest-benchmark with its result as extra info; returns (result, N_v, N_r)."""
    scale = float(os.environ.get(scale_env, "1"))
    nv, nr = max(int(NV * scale), 50), max(int(NR * scale), 50)
    results: list[dict] = []
    benchmark.pedantic(lambda: results.append(run_step(script, step, nv, nr, timeout)), rounds=1, iterations=1)
    benchmark.extra_info.update(results[-1])
    return results[-1], nv, nr


def worker_main(worker) -> None:
    """The script entry point: ``worker(step, nv, nr)`` from the command line, its dict printed as JSON."""
    print(json.dumps(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
