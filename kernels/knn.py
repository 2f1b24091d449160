"""Exact kNN in Triton: a fused GEMM + running top-C kernel proposes candidates, then an exact float64 re-score.

Same result as ``vireid_fast.ops.reference.knn_ref`` and the C++ kernel (float64 scores, ties to the lower index):
the kernel's float32 scores (IEEE products, no TF32) carry a rigorous error bound; each row keeps its best C
approximate candidates, which provably contain the exact top-k when the C-th is more than the bound below the k-th
lower bound.
Rows where that fails are redone exactly. Memory: O(N * C) candidates, never N x M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BIG_INDEX = 2**31 - 1


@triton.jit
def _candidates_kernel(x_ptr, y_ptr, sub_ptr, out_s_ptr, out_i_ptr, N, M, D,
                       C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    slots = tl.arange(0, C_PAD)
    best_s = tl.full((BLOCK_M, C_PAD), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK_M, C_PAD), _BIG_INDEX, tl.int32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_mask = dims < D
            xa = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + dims[None, :],
                         mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            yb = tl.load(y_ptr + cols[:, None].to(tl.int64) * D + dims[None, :],
                         mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
            acc += tl.dot(xa, tl.trans(yb), input_precision="ieee", out_dtype=tl.float32)
        sub = tl.load(sub_ptr + cols, mask=col_mask, other=0.0)
        s = tl.where(col_mask[None, :], acc - sub[None, :], float("-inf"))
        idx = tl.where(col_mask[None, :], cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), tl.int32), _BIG_INDEX)
        # New best C_PAD of (kept candidates, this block): repeated extraction of the best (score, then lower index).
        new_s = tl.full((BLOCK_M, C_PAD), float("-inf"), tl.float32)
        new_i = tl.full((BLOCK_M, C_PAD), _BIG_INDEX, tl.int32)
        for t in range(C_PAD):
            top = tl.maximum(tl.max(best_s, 1), tl.max(s, 1))
            pick = tl.minimum(tl.min(tl.where(best_s == top[:, None], best_i, _BIG_INDEX), 1),
                              tl.min(tl.where(s == top[:, None], idx, _BIG_INDEX), 1))
            new_s = tl.where(slots[None, :] == t, top[:, None], new_s)
            new_i = tl.where(slots[None, :] == t, pick[:, None], new_i)
            best_s = tl.where(best_i == pick[:, None], float("-inf"), best_s)
            best_i = tl.where(best_i == pick[:, None], _BIG_INDEX, best_i)
            s = tl.where(idx == pick[:, None], float("-inf"), s)
            idx = tl.where(idx == pick[:, None], _BIG_INDEX, idx)
        best_s = new_s
        best_i = new_i
    out = rows[:, None].to(tl.int64) * C_PAD + slots[None, :]
    tl.store(out_s_ptr + out, best_s, mask=row_mask[:, None])
    tl.store(out_i_ptr + out, best_i, mask=row_mask[:, None])


def _exact_keys(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, l2: bool) -> torch.Tensor:
    """Float64 keys (smaller is better) of candidates idx (N, C) for the rows of x, in row chunks of bounded size."""
    keys = torch.empty(idx.shape, dtype=torch.float64, device=x.device)
    step = max(1, 2**25 // max(1, idx.shape[1] * x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        xd = x[r0:r0 + step].double()
        yd = y[idx[r0:r0 + step]].double()
        dots = torch.einsum("nd,ncd->nc", xd, yd)
        keys[r0:r0 + step] = ((xd * xd).sum(1, keepdim=True) + (yd * yd).sum(2) - 2.0 * dots) if l2 else -dots
    return keys


def _select(keys: torch.Tensor, idx: torch.Tensor, k: int, l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Order by key, ties by the lower index: sort by index first, then a stable sort by key.
    by_index = torch.sort(idx, dim=1, stable=True).indices
    keys, idx = keys.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(keys, dim=1, stable=True).indices[:, :k]
    best = keys.gather(1, order)
    values = best.clamp_min(0.0) if l2 else -best
    return values.float(), idx.gather(1, order)


def launch(x: torch.Tensor, y: torch.Tensor, k: int, metric: str, precision: str,
           block_m: int | None = None, block_n: int | None = None,
           block_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and result as ``knn_ref``: values (N, k) float32, indices (N, k) int64."""
    # Small blocks keep the interpreter (CPU tensors, tests) fast; GPUs want larger tiles.
    on_gpu = x.device.type == "cuda"
    block_m = block_m or (64 if on_gpu else 16)
    block_n = block_n or (64 if on_gpu else 32)
    block_d = block_d or (64 if on_gpu else 32)
    n, d = x.shape
    m = y.shape[0]
    l2 = metric == "l2"
    x = x.contiguous()
    y = y.contiguous()
    c = min(m, k + max(k, 16))
    c_pad = triton.next_power_of_2(c)
    ny2 = (y.double() ** 2).sum(1)
    nx = (x.double() ** 2).sum(1).sqrt()
    ny_max = float(ny2.max().sqrt())
    u32 = 2.0**-24
    gamma = (d + 2) * u32 / (1 - (d + 2) * u32)
    # The search runs in float32 whatever `precision` asks (the result is the same by construction); the bf16
    # candidate search is a CPU kernel feature (the Triton interpreter cannot run bf16 dots to test it here).
    del precision
    xa, ya = x, y
    bound = gamma * nx * ny_max
    sub = (0.5 * ny2).float() if l2 else torch.zeros(m, dtype=torch.float32, device=x.device)
    if l2:
        bound = bound + 4 * u32 * (nx * ny_max + float(ny2.max()))
    bound = 1.25 * bound + 1e-30

    cand_s = torch.empty((n, c_pad), dtype=torch.float32, device=x.device)
    cand_i = torch.empty((n, c_pad), dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n, block_m),)
    _candidates_kernel[grid](xa, ya, sub, cand_s, cand_i, n, m, d, C_PAD=c_pad, BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_D=block_d)
    cand_s, cand_i = cand_s[:, :c].double(), cand_i[:, :c].long()  # best first
    lower_k = cand_s[:, k - 1] - bound  # the k-th largest lower bound (uniform bound per row)
    possible = cand_s + bound[:, None] >= lower_k[:, None]
    overflow = (cand_s[:, -1] + bound >= lower_k) if c < m else torch.zeros(n, dtype=torch.bool, device=x.device)
    keys = _exact_keys(x, y, cand_i, l2).masked_fill(~possible, float("inf"))
    values, indices = _select(keys, cand_i, k, l2)
    redo = torch.nonzero(overflow).flatten()
    if redo.numel():
        all_idx = torch.arange(m, device=x.device).expand(redo.numel(), m)
        values[redo], indices[redo] = _select(_exact_keys(x[redo], y, all_idx, l2), all_idx, k, l2)
    return values, indices
