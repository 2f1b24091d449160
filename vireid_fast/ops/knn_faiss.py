"""faiss as a candidate search engine of ``vireid_fast.ops.knn``: same exact result, faiss does the GEMM.

faiss's flat search (CPU: ``faiss.knn`` on numpy arrays, the code behind ``IndexFlatIP`` / ``IndexFlatL2``; CUDA:
``faiss.knn_gpu`` on torch tensors through ``faiss.contrib.torch_utils``) scores in float32 and breaks ties
arbitrarily, so here it only *proposes* candidates. The result is the one every vireid backend returns:
``score(i, j)`` = the float64 sum of the float32 products (summed like the C++ kernel: 32 strided accumulators,
then a fixed folding), ``"ip"`` ranks by the largest score, ``"l2"`` by the smallest ``||x||^2 + ||y||^2 -
2 score``, equal keys go to the lower index, values are the float32 of the float64 key.

How: faiss returns the best C = min(M, k + max(k, 16)) approximate candidates per row. Every float32 distance faiss
can compute carries a rigorous error bound delta_i (below). The exact k-th key of row i is at most U_i = the k-th
smallest approximate key + delta_i; a column faiss did not return has an approximate key >= the C-th returned one,
so when the C-th key - delta_i > U_i no dropped column can reach the top k, and the candidates whose lower bound is
<= U_i are re-scored exactly. Rows where that margin check fails (dense near-ties) are redone by ``vireid::knn``.

Error bounds (u = 2^-24, gamma_n = n u / (1 - n u), any float32 summation order, FMA or not):
* "ip": faiss's inner product is one float32 dot (BLAS sgemm, or a SIMD loop for few queries):
  |err| <= gamma_{d+2} ||x_i|| max_j ||y_j||.
* "l2": faiss computes either ``||x||^2 + ||y||^2 - 2 x.y`` from float32 norms and a float32 GEMM (BLAS path, GPU)
  or ``sum_t (x_t - y_t)^2`` directly (few queries). Both are float32 expressions whose every intermediate is bounded
  by (||x|| + ||y||)^2, so |err| <= gamma_{d+4} (||x_i|| + max_j ||y_j||)^2 covers both (the clamp at 0 only moves
  a value towards the true non-negative distance).
A safety factor of 2 covers the rounding of the norms used in the bound itself. On CUDA, faiss's
StandardGpuResources keep cuBLAS in its default math mode with reduced-precision reductions disallowed (float32
GEMMs, no TF32), and the cuVS path is not requested, so the same bounds hold. (The CUDA path could not be run on the
development machine, which has no GPU.)
"""

from __future__ import annotations

import math

import torch

__all__ = ["faiss_available", "knn_faiss", "INSTALL_HINT"]

INSTALL_HINT = ("faiss is not installed: `pip install faiss-cpu` (CPU tensors), or faiss-gpu / faiss-gpu-cu12 for "
                "CUDA tensors (or `pip install vireid_fast[faiss]`)")

# faiss's GPU k-selection handles at most this many neighbours per query (GPU_MAX_SELECTION_K).
_GPU_MAX_K = 2048
_SAFETY = 2.0
# Float64 elements of the temporaries: norms (rows x d) 32 MiB; re-score accumulators (rows x W x 32) 2 MiB.
_RESCORE_BUDGET = 2**22
_ACC_BUDGET = 2**18
# Query rows handed to faiss per call (its BLAS path blocks queries by 4096 itself).
_SEARCH_ROWS = 8192

_gpu_resources = None


def _import_faiss():
    import faiss

    return faiss


def faiss_available(device: torch.device | str = "cpu") -> bool:
    """Whether faiss can search tensors on ``device``: importable, and with GPU support for CUDA devices."""
    device = torch.device(device)
    try:
        faiss = _import_faiss()
    except ImportError:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        try:
            return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        except (AttributeError, RuntimeError):
            return False
    return False


def _faiss_search(x: torch.Tensor, y: torch.Tensor, c: int, l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss's approximate top-c: distances (R, c) float32 (ip: largest first; l2: smallest first), ids (R, c)."""
    global _gpu_resources
    faiss = _import_faiss()
    metric = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT
    if x.device.type == "cuda":
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors, on torch's stream)

        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return faiss.knn_gpu(_gpu_resources, x, y, c, metric=metric, device=device)
    dist, ids = faiss.knn(x.numpy(), y.numpy(), c, metric=metric)
    return torch.from_numpy(dist), torch.from_numpy(ids)


# The exact scores are summed as ``dot_exact`` in csrc/common.h, so that they carry the C++ kernel's bits: accumulator
# u (0..31) adds the products of the columns t = u mod 32 in order of t, starting from +0.0, then the accumulators are
# folded as acc[u] += acc[u + w] for w = 16, 8, 4, 2, 1. Products of float32 numbers are exact in float64, so whether
# a multiply-add is fused does not matter. Columns are handled as "slabs" of 32 (zero-padded: adding +0.0 to a
# partial sum that is never -0.0 leaves it unchanged).
_LANES = 32


def _slabs(v: torch.Tensor) -> torch.Tensor:
    """(R, d) float32 -> (S, R, 32) float32 with S = ceil(d / 32): slab s holds columns 32 s .. 32 s + 31."""
    pad = (-v.shape[1]) % _LANES
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return v.unflatten(1, (-1, _LANES)).transpose(0, 1).contiguous()


def _combine(acc: torch.Tensor) -> torch.Tensor:
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def _sq_norms(v: torch.Tensor) -> torch.Tensor:
    """(R, d) float32 -> (R,) float64 ||v_r||^2, the C++ kernel's bits."""
    out = torch.empty(v.shape[0], dtype=torch.float64, device=v.device)
    step = max(1, _RESCORE_BUDGET // max(1, v.shape[1]))
    for r0 in range(0, v.shape[0], step):
        slabs = _slabs(v[r0:r0 + step]).double()
        acc = torch.zeros(slabs.shape[1:], dtype=torch.float64, device=v.device)
        for slab in slabs:
            acc.addcmul_(slab, slab)
        out[r0:r0 + step] = _combine(acc)
    return out


def _exact_keys(x: torch.Tensor, nx2: torch.Tensor, y_slabs: torch.Tensor, ny2: torch.Tensor, idx: torch.Tensor,
                l2: bool) -> torch.Tensor:
    """Exact float64 keys (smaller is better) of candidates idx (R, W) for the rows x (R, d), the C++ kernel's bits.

    ``y_slabs`` is ``_slabs(y)``; the candidates' columns are gathered slab by slab, so the temporaries stay at
    (rows, W, 32) whatever d is.
    """
    keys = torch.empty(idx.shape, dtype=torch.float64, device=x.device)
    width = idx.shape[1]
    step = max(1, _ACC_BUDGET // max(1, width * _LANES))
    for r0 in range(0, x.shape[0], step):
        rows = idx[r0:r0 + step]
        flat = rows.flatten()
        x_slabs = _slabs(x[r0:r0 + step]).double()
        acc = torch.zeros(rows.shape + (_LANES,), dtype=torch.float64, device=x.device)
        for s in range(x_slabs.shape[0]):
            cand = torch.index_select(y_slabs[s], 0, flat).view(acc.shape).double()
            acc.addcmul_(cand, x_slabs[s][:, None, :])
        dots = _combine(acc)
        # Left to right as in C++: (||x||^2 + ||y||^2) - 2 score.
        keys[r0:r0 + step] = (nx2[r0:r0 + step, None] + ny2[rows]) - 2.0 * dots if l2 else -dots
    return keys


def _select(keys: torch.Tensor, idx: torch.Tensor, k: int, l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest keys per row, equal keys by the lower index: values (R, k) float32, indices (R, k) int64."""
    by_index = torch.sort(idx, dim=1).indices  # indices within a row are distinct
    keys, idx = keys.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(keys, dim=1, stable=True).indices[:, :k]
    best = keys.gather(1, order)
    values = best.clamp_min(0.0) if l2 else -best
    return values.float(), idx.gather(1, order)


def _exact_search(x: torch.Tensor, y: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """vireid's own exact search (the C++ / Triton kernel, or the reference when the extension is missing).

    ``vireid::knn`` is registered by the package ``vireid_fast.ops``, imported before this module."""
    return torch.ops.vireid.knn(x, y, k, metric, "fp32")


def knn_faiss(x: torch.Tensor, y: torch.Tensor | None, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of every row of ``x`` among the rows of ``y`` with faiss proposing candidates.

    Args:
        x: (N, d) float32 queries (CPU, or CUDA with faiss-gpu).
        y: (M, d) float32 database on the same device, or None for ``x`` itself.
        k: 1 <= k <= M.
        metric: ``"ip"`` or ``"l2"``.
    Returns:
        values (N, k) float32, indices (N, k) int64: bit-identical to ``torch.ops.vireid.knn`` (same indices as
        ``knn_ref``, whose float64 sums run in another order, so its values can differ by a float32 ulp).

    Inputs are assumed validated (``vireid_fast.ops.knn`` does it). Not traceable by ``torch.compile`` (faiss runs
    outside torch); use ``engine="vireid"`` inside compiled code.
    """
    # faiss reads detached arrays; the search is not differentiable (vireid::knn has no autograd formula either).
    x = x.detach().float().contiguous()
    y = x if y is None else y.detach().float().contiguous()
    l2 = metric == "l2"
    n, d = x.shape
    m = y.shape[0]
    c = min(m, k + max(k, 16))
    if x.device.type == "cuda":
        c = min(c, _GPU_MAX_K)
    if n == 0 or (c <= k and c < m):  # faiss cannot return a margin beyond the top k: our kernel does it all
        return _exact_search(x, y, k, metric)

    nx2, ny2 = _sq_norms(x), (_sq_norms(y) if y is not x else None)
    ny2 = nx2 if ny2 is None else ny2
    nx, ny_max = nx2.sqrt(), float(ny2.max().sqrt())
    u32 = 2.0**-24
    if l2:
        gamma = (d + 4) * u32 / (1.0 - (d + 4) * u32)
        delta = (nx + ny_max) ** 2 * gamma
    else:
        gamma = (d + 2) * u32 / (1.0 - (d + 2) * u32)
        delta = nx * (ny_max * gamma)
    delta = _SAFETY * delta + 1e-30
    if not math.isfinite(float(delta.max())):  # norms near the float32 range: no usable bound
        return _exact_search(x, y, k, metric)

    y_slabs = _slabs(y)  # a copy of y, slab-major (S, M, 32)
    values = torch.empty((n, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=x.device)
    redo = []
    for r0 in range(0, n, _SEARCH_ROWS):
        r1 = min(n, r0 + _SEARCH_ROWS)
        dist, ids = _faiss_search(x[r0:r1], y, c, l2)
        approx = dist.to(x.device, torch.float64)
        approx = approx if l2 else -approx  # keys: smaller is better
        ids = ids.to(x.device, torch.int64)
        approx, order = torch.sort(approx, dim=1, stable=True)
        ids = ids.gather(1, order)
        dlt = delta[r0:r1, None]
        upper_k = approx[:, k - 1:k] + dlt  # the exact k-th key is at most this
        ok = (ids >= 0).all(1)  # faiss marks missing results with -1 (cannot happen for finite inputs)
        if c < m:  # columns faiss dropped have approximate keys >= its C-th one
            ok &= (approx[:, -1:] - dlt > upper_k).squeeze(1)
        # Contenders (lower bound <= upper_k) form a prefix of the sorted candidates; re-score up to the widest.
        contenders = (approx - dlt <= upper_k).sum(1)
        rows = torch.nonzero(ok).flatten()
        if rows.numel():
            width = int(contenders[rows].max())
            cand = ids[rows, :width]
            g = rows + r0
            keys = _exact_keys(x[g], nx2[g], y_slabs, ny2, cand, l2)
            values[g], indices[g] = _select(keys, cand, k, l2)
        redo.append(torch.nonzero(~ok).flatten() + r0)
    redo = torch.cat(redo)
    if redo.numel():  # margins too thin for faiss's candidates: vireid's search on those rows only
        values[redo], indices[redo] = _exact_search(x[redo].contiguous(), y, k, metric)
    return values, indices
