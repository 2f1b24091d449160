"""CMFP (SALCR Eq. 28-29) in Triton: tiled similarities, never a dense (Nv+Nr)^2 matrix.

Four kernels, each streaming column tiles of one block (visible or infrared columns) for a tile of rows, recomputing
the similarity tile with ``tl.dot`` (IEEE fp32, no TF32):

1. ``_threshold_kernel``: the k-th largest value of each row in the block (counted with multiplicity), from a
   (BLOCK_M, KPAD) buffer of the k largest values so far, merged with each tile by k max-extractions (KPAD = next
   power of two >= k; cheaper than ``tl.topk`` for small k and fast under the interpreter);
2. ``_count_kernel``: number and sum of the kept positive entries (>= threshold, > 0) per row and block;
3. ``_write_kernel``: the CSR columns and weights (value / block sum) at offsets from the host-side prefix sum;
4. ``_propagate_kernel``: out_i = sum_e w_e x_col(e), then L2 normalisation (one program per row).

Same result definition as ``vireid_fast.ops.reference.cmfp_ref``; a block row with no positive kept value
contributes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 1024  # the top-k buffer lives in registers; larger k is served by the reference (see launch)


@triton.jit
def _sim_tile(x_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + dd[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        b = tl.load(x_ptr + cols[None, :].to(tl.int64) * D + dd[:, None], mask=col_mask[None, :] & d_mask[:, None],
                    other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _program_rows(N, NV, BLOCK_M: tl.constexpr):
    """This program's block of rows and its column block: visible columns [0, NV) for blk 0, infrared [NV, N) else."""
    blk = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_lo = tl.where(blk == 0, 0, NV)
    c_hi = tl.where(blk == 0, NV, N)
    return blk, rows, rows < N, c_lo, c_hi


@triton.jit
def _threshold_kernel(x_ptr, thr_ptr, N, NV, D, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KPAD: tl.constexpr, BLOCK_D: tl.constexpr):
    blk, rows, row_mask, c_lo, c_hi = _program_rows(N, NV, BLOCK_M)
    slot = tl.arange(0, KPAD)
    lane = tl.arange(0, BLOCK_N)
    best = tl.full((BLOCK_M, KPAD), float("-inf"), tl.float32)  # the K largest so far, descending, with multiplicity
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + lane
        col_mask = cols < c_hi
        s = _sim_tile(x_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D, BLOCK_M, BLOCK_N)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        # Merge by K extractions of the largest remaining value, removing one occurrence each time (ties counted).
        old = best
        for i in range(K):
            m_old = tl.max(old, axis=1)
            m_new = tl.max(s, axis=1)
            from_old = m_old >= m_new
            best = tl.where(slot[None, :] == i, tl.maximum(m_old, m_new)[:, None], best)
            i_old = tl.argmax(old, axis=1, tie_break_left=True)
            i_new = tl.argmax(s, axis=1, tie_break_left=True)
            old = tl.where(from_old[:, None] & (slot[None, :] == i_old[:, None]), float("-inf"), old)
            s = tl.where((~from_old)[:, None] & (lane[None, :] == i_new[:, None]), float("-inf"), s)
    kth = tl.max(tl.where(slot[None, :] == K - 1, best, float("-inf")), axis=1)
    tl.store(thr_ptr + blk.to(tl.int64) * N + rows, kth, mask=row_mask)


@triton.jit
def _count_kernel(x_ptr, thr_ptr, cnt_ptr, sum_ptr, N, NV, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    blk, rows, row_mask, c_lo, c_hi = _program_rows(N, NV, BLOCK_M)
    thr = tl.load(thr_ptr + blk.to(tl.int64) * N + rows, mask=row_mask, other=0.0)
    cnt = tl.zeros((BLOCK_M,), tl.int32)
    tot = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < c_hi
        s = _sim_tile(x_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D, BLOCK_M, BLOCK_N)
        keep = col_mask[None, :] & (s >= thr[:, None]) & (s > 0)
        cnt += tl.sum(keep.to(tl.int32), axis=1)
        tot += tl.sum(tl.where(keep, s, 0.0), axis=1)
    tl.store(cnt_ptr + blk.to(tl.int64) * N + rows, cnt, mask=row_mask)
    tl.store(sum_ptr + blk.to(tl.int64) * N + rows, tot, mask=row_mask)


@triton.jit
def _write_kernel(x_ptr, thr_ptr, sum_ptr, start_ptr, col_out_ptr, val_out_ptr, N, NV, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    blk, rows, row_mask, c_lo, c_hi = _program_rows(N, NV, BLOCK_M)
    thr = tl.load(thr_ptr + blk.to(tl.int64) * N + rows, mask=row_mask, other=0.0)
    tot = tl.load(sum_ptr + blk.to(tl.int64) * N + rows, mask=row_mask, other=1.0)
    inv = 1.0 / tl.where(tot > 0, tot, 1.0)
    offset = tl.load(start_ptr + blk.to(tl.int64) * N + rows, mask=row_mask, other=0)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < c_hi
        s = _sim_tile(x_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D, BLOCK_M, BLOCK_N)
        keep = row_mask[:, None] & col_mask[None, :] & (s >= thr[:, None]) & (s > 0)
        k32 = keep.to(tl.int32)
        pos = offset[:, None] + tl.cumsum(k32, axis=1) - 1
        tl.store(col_out_ptr + pos, (cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), tl.int32)).to(tl.int64), mask=keep)
        tl.store(val_out_ptr + pos, s * inv[:, None], mask=keep)
        offset += tl.sum(k32, axis=1)


@triton.jit
def _propagate_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, out_ptr, D, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e0 = tl.load(crow_ptr + row)
    e1 = tl.load(crow_ptr + row + 1)
    ss = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for eb in range(e0, e1, BLOCK_E):
            ee = eb + tl.arange(0, BLOCK_E)
            e_mask = ee < e1
            j = tl.load(col_ptr + ee, mask=e_mask, other=0)
            w = tl.load(val_ptr + ee, mask=e_mask, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + j[:, None] * D + dd[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0)
            acc += tl.sum(w[:, None] * xs.to(tl.float32), axis=0)
        ss += acc * acc
        tl.store(out_ptr + row * D + dd, acc, mask=d_mask)
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), 1e-12)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        v = tl.load(out_ptr + row * D + dd, mask=d_mask, other=0.0)
        tl.store(out_ptr + row * D + dd, v * scale, mask=d_mask)


def launch(features_v: torch.Tensor, features_r: torch.Tensor,
           k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments and results as ``cmfp_ref`` (features float32; float64 inputs are computed in float32)."""
    nv, d = features_v.shape
    nr = features_r.shape[0]
    if k > MAX_K:
        import warnings

        from vireid_fast.ops.reference import cmfp_ref

        warnings.warn(f"vireid_fast: the Triton CMFP kernel supports k <= {MAX_K}; k={k} runs the dense reference",
                      RuntimeWarning, stacklevel=2)
        return cmfp_ref(features_v, features_r, k)
    dtype, device = features_v.dtype, features_v.device
    x = torch.cat([features_v, features_r]).to(torch.float32).contiguous()
    n = nv + nr
    interp = device.type == "cpu"
    kpad = max(16, triton.next_power_of_2(k))
    # The interpreter pays per program and per op, not per element: few, large tiles there.
    block_m = 128 if interp else 64
    # Every pass must recompute bit-identical tiles (same shapes), or `s >= threshold` could flip at the k-th entry.
    block_n = 128 if interp else 64
    block_d = min(128 if interp else 64, max(16, triton.next_power_of_2(d)))
    grid = (triton.cdiv(n, block_m), 2)
    thr = torch.empty(2, n, dtype=torch.float32, device=device)
    _threshold_kernel[grid](x, thr, n, nv, d, k, BLOCK_M=block_m, BLOCK_N=block_n, KPAD=kpad, BLOCK_D=block_d)
    cnt = torch.empty(2, n, dtype=torch.int32, device=device)
    sums = torch.empty(2, n, dtype=torch.float32, device=device)
    _count_kernel[grid](x, thr, cnt, sums, n, nv, d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    per_row = cnt.to(torch.int64).sum(0)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    crow[1:] = per_row.cumsum(0)
    start = torch.stack([crow[:-1], crow[:-1] + cnt[0].to(torch.int64)]).contiguous()
    nnz = int(crow[-1])
    cols = torch.empty(nnz, dtype=torch.int64, device=device)
    vals32 = torch.empty(nnz, dtype=torch.float32, device=device)
    _write_kernel[grid](x, thr, sums, start, cols, vals32, n, nv, d, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_D=block_d)
    out = torch.empty(n, d, dtype=torch.float32, device=device)
    _propagate_kernel[(n,)](x, crow, cols, vals32, out, d, BLOCK_E=64 if interp else 16,
                            BLOCK_D=min(256, max(16, triton.next_power_of_2(d))))
    out = out.to(dtype)
    return out[:nv].contiguous(), out[nv:].contiguous(), crow, cols, vals32.to(dtype)
