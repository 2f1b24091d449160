"""Exact k nearest neighbours (the kNN step of the k-reciprocal Jaccard distance), streamed in tiles.

``knn`` never forms the N x M score matrix: each tile of scores comes from one GEMM and is merged into per-row
candidate lists, then the candidates are re-scored exactly. The result is defined independently of the GEMM: scores
are float64 sums of the float32 products, ties go to the lower index (faiss breaks them arbitrarily).
"""

from __future__ import annotations

import os

import torch

from . import _registry
from ._checks import check_knn, choice, finite
from ._validation import FLOAT_DTYPES, check_int, check_same_device, check_tensor, tracing
from .reference import knn_ref

__all__ = ["knn", "knn_ref"]

METRICS = ("ip", "l2")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("auto", "vireid", "faiss")


def _knn_fake(x, y, k, metric, precision):
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.int64)


_registry.register("knn", reference=knn_ref, fake=_knn_fake, check=check_knn)


def _bf16_worthwhile(x: torch.Tensor, m: int) -> bool:
    # Large searches on CPUs with native bf16 dot products (AVX512-BF16 or AMX-BF16), where the C++ kernels run a
    # float32-output bf16 GEMM several times faster than fp32; rows whose candidate margin overflows only pay an extra
    # fp32 pass over themselves (the result is exact either way). Mirrors the kernels' choice, VIREID_CPU_ISA cap
    # included: on a CPU with AVX-512 but no bf16 dot products the bf16 GEMM would be emulated and slower than fp32.
    if x.device.type != "cpu" or x.shape[0] * m * x.shape[1] < 2**30:
        return False
    if os.environ.get("VIREID_CPU_ISA") in ("avx2", "baseline"):
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def _use_faiss(engine: str, device: torch.device) -> bool:
    # "auto": faiss only on CUDA (the well-kept library for this search there); on CPU our kernels run by default.
    if engine == "vireid" or (engine == "auto" and (device.type != "cuda" or tracing()
                                                    or _registry.requested_backend() is not None)):
        return False
    from .knn_faiss import INSTALL_HINT, faiss_available

    if faiss_available(device):
        return True
    if engine == "faiss":
        raise ValueError(f"engine='faiss' cannot search {device.type} tensors: {INSTALL_HINT}; "
                         "or pass engine='vireid'")
    return False


def knn(x: torch.Tensor, k: int, y: torch.Tensor | None = None, *, metric: str = "ip",
        precision: str = "auto", engine: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of every row of ``x`` among the rows of ``y`` (default ``x`` itself, the row included).

    Args:
        x: (N, d) float32 queries (other float dtypes are cast to float32).
        k: neighbours per row, 1 <= k <= M.
        y: (M, d) database, same device; default ``x``.
        metric: ``"ip"`` (largest inner product first) or ``"l2"`` (smallest squared Euclidean distance first).
        precision: candidate search GEMM: ``"fp32"``, ``"bf16"`` or ``"auto"``. It changes the speed only: the
            candidates are re-scored exactly, so every choice returns the same result.
        engine: who proposes the candidates: ``"vireid"`` (our C++ / Triton kernels), ``"faiss"`` (faiss's exact flat
            search, ``vireid_fast.ops.knn_faiss``; needs ``pip install faiss-cpu``, or faiss-gpu for CUDA tensors) or
            ``"auto"`` (faiss for CUDA tensors when faiss has GPU support, else ours). The result is the same
            whichever engine runs (faiss only proposes, the candidates are re-scored exactly); ``precision`` applies
            to ours. The faiss engine is not traceable by ``torch.compile``: "auto" uses ours while tracing.
            ``VIREID_BACKEND=reference`` overrides the engine; another forced backend makes "auto" mean ours.
    Returns:
        values (N, k) float32 (inner products, or squared distances), indices (N, k) int64, best first; equal scores
        go to the lower index. Detached: a search is not differentiable.
    """
    check_tensor("x", x, dims=(2,), dtypes=FLOAT_DTYPES)
    if y is not None:
        check_tensor("y", y, dims=(2,), dtypes=FLOAT_DTYPES)
        check_same_device(x=x, y=y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"x and y must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    choice("metric", metric, METRICS)
    choice("precision", precision, PRECISIONS)
    choice("engine", engine, ENGINES)
    m = x.shape[0] if y is None else y.shape[0]
    check_int("k", k, 1)
    if k > m:
        raise ValueError(f"k={k} is larger than the number of database rows ({m}); pass k <= {m}")
    xf = x.detach().float().contiguous()  # a search: the values are not differentiable
    yf = xf if y is None else y.detach().float().contiguous()
    if precision == "auto":
        precision = "bf16" if _bf16_worthwhile(xf, m) else "fp32"
    if _registry.requested_backend() != "reference" and _use_faiss(engine, xf.device):
        from .knn_faiss import knn_faiss

        finite("x", xf)  # faiss is not behind the op's validation layer
        if y is not None:
            finite("y", yf)
        return knn_faiss(xf, None if y is None else yf, k, metric)
    backend = _registry.choose_backend("knn", xf.device)
    return _registry.run("knn", backend, xf.device, xf, yf, k, metric, precision)
