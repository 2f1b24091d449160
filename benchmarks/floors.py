"""Physical floors of the similarity searches, measured in the benchmark's own process: the GEMMs alone.

A search of queries A (n x d) against a database B (m x d) needs at least the products A @ B.T; a symmetric search
(A is B) needs only half of them (each tile pair once). ``gemm_floors`` times those products, in tiles of 1,024 x 1,024
(as the kernels run them, so no n x m matrix is held), with:

* ``fp32``: torch.mm on float32 (MKL's sgemm in torch's CPU build);
* ``bf16``: torch.mm on bf16 tensors (oneDNN; bf16 output), the candidate GEMM of our kNN on CPUs without AMX;
* ``bf16_f32out``: the float32-output bf16 GEMM our kNN uses on AMX CPUs (MKL ``cblas_gemm_bf16bf16f32``) and our
  AVX512-BF16 kernel, through the extension's exported ``vireid_gemm_bf16_f32`` (missing kinds are left out).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import platform
import time

import torch

TILE = 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = ""
                    break
            else:
                name = platform.processor()
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = ",".join(f for f in ("avx512_bf16", "amx_bf16") if f in have) or "no bf16 units"
                    break
        return f"{name} ({flags}, {os.cpu_count()} vCPUs)"
    except OSError:
        return platform.processor() or "unknown"


def _ours():
    import vireid_fast

    paths = glob.glob(os.path.join(os.path.dirname(vireid_fast.__file__), "_C*.so"))
    if not paths:
        return None
    fn = ctypes.CDLL(paths[0]).vireid_gemm_bf16_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64]
    return fn


def _run_ours(fn, kind, out, a, b, d, i0, i1, j0, j1):
    fn(kind, out.data_ptr(), TILE, a[i0].data_ptr(), i1 - i0, b[j0].data_ptr(), j1 - j0, d)


def _tiles(n: int, m: int, symmetric: bool):
    for i0 in range(0, n, TILE):
        for j0 in range(i0 if symmetric else 0, m, TILE):
            yield i0, min(n, i0 + TILE), j0, min(m, j0 + TILE)


def gemm_floors(a: torch.Tensor, b: torch.Tensor | None = None, repeats: int = 2) -> dict[str, float]:
    """Seconds (best of ``repeats``) of the products a search of a against b (default: a itself, symmetric) needs."""
    symmetric = b is None
    b = a if b is None else b
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    ab, bb = a.bfloat16().contiguous(), b.bfloat16().contiguous()
    out32 = torch.empty(TILE, TILE)
    out16 = torch.empty(TILE, TILE, dtype=torch.bfloat16)
    runs = {
        "fp32": lambda i0, i1, j0, j1: torch.mm(a[i0:i1], b[j0:j1].T, out=out32[: i1 - i0, : j1 - j0]),
        "bf16": lambda i0, i1, j0, j1: torch.mm(ab[i0:i1], bb[j0:j1].T, out=out16[: i1 - i0, : j1 - j0]),
    }
    ours = _ours()
    if ours is not None and d % 2 == 0:
        for kind, name in ((1, "bf16_f32out_avx512bf16"), (2, "bf16_f32out_mkl")):
            if ours(kind, None, 1, None, 0, None, 0, 2) == kind:
                runs[name] = functools.partial(_run_ours, ours, kind, out32, ab, bb, d)
    best: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, best of each
        for name, run in runs.items():
            start = time.perf_counter()
            for tile in _tiles(n, m, symmetric):
                run(*tile)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def format_floors(floors: dict[str, float], ours: float) -> str:
    return "  ".join(f"{name} {sec:.3f} s (ours/floor {ours / sec:.2f}x)" for name, sec in floors.items())
