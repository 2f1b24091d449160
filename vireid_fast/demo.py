"""`make demo` until the trainer lands: a short end-to-end run of the ops on synthetic visible/infrared features.

Builds clustered features for two modalities, runs every available op on them with each available backend, and prints
a table of results and timings.
"""

from __future__ import annotations

import os
import time

import torch

import vireid_fast
from vireid_fast import ops
from vireid_fast.ops.sinkhorn import squared_euclidean


def synthetic_features(ids: int = 200, per_id: int = 20, dim: int = 256, seed: int = 0):
    """(visible, infrared, pids): identity centres shared across modalities plus a modality offset and noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(ids, dim, generator=g), dim=1)
    gap = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    pids = torch.arange(ids).repeat_interleave(per_id)
    vis = torch.nn.functional.normalize(centres[pids] + 0.25 * torch.randn(len(pids), dim, generator=g), dim=1)
    ir = torch.nn.functional.normalize(centres[pids] + 0.6 * gap + 0.25 * torch.randn(len(pids), dim, generator=g),
                                       dim=1)
    return vis, ir, pids


def _timed(fn, repeat: int = 3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    print(f"vireid_fast {vireid_fast.__version__} — torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, info in vireid_fast.backends().items():
        print(f"  backend {name:<7} {'yes' if info['available'] else 'no ':<4} {info['reason']}")
    vis, ir, pids = synthetic_features()
    print(f"\nsynthetic features: {len(vis)} visible + {len(ir)} infrared, {len(pids.unique())} identities, "
          f"d={vis.shape[1]}")

    # Cross-modality association: infrared instances -> visible identity prototypes by OT (SALCR DAGL, lam=5).
    protos = torch.nn.functional.normalize(torch.stack([vis[pids == i].mean(0) for i in range(int(pids.max()) + 1)]),
                                           dim=1)
    rows = []


    for backend in ("cpp", "reference"):
        if backend == "cpp" and not vireid_fast.backends()["cpp"]["available"]:
            continue
        os.environ["VIREID_BACKEND"] = backend
        seconds, (labels, plan) = _timed(lambda: ops.ot_assign(ir, protos, 5.0))
        acc = float((labels == pids).float().mean())
        rows.append(("ot_assign (IR -> visible ids)", backend, f"{tuple(plan.shape)}", f"accuracy {acc:.3f}", seconds))
        cost = squared_euclidean(ir, protos)
        seconds, (plan, info) = _timed(lambda c=cost: ops.sinkhorn(c, 25.0, return_info=True))
        rows.append(("sinkhorn lam=25", backend, f"{tuple(plan.shape)}",
                     f"{int(info.n_iter[0])} iters, err {float(info.err[0]):.1e}", seconds))
    os.environ.pop("VIREID_BACKEND", None)

    print(f"\n{'op':<32}{'backend':<11}{'shape':<14}{'result':<28}{'time':>10}")
    print("-" * 95)
    for op, backend, shape, result, seconds in rows:
        print(f"{op:<32}{backend:<11}{shape:<14}{result:<28}{seconds * 1e3:>8.1f} ms")


if __name__ == "__main__":
    main()
