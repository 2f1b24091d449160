"""Log-domain Sinkhorn in Triton: a column-update kernel, a row-update kernel and a plan kernel.

Same iteration as ``vireid_fast.ops.reference.sinkhorn_ref``; both log-sum-exps are exact online (max-rescaled)
reductions. Potentials are kept in the cost's dtype, so each cost row is first shifted by its minimum (as the reference
does): the plan and the iterates are unchanged, and the potentials stay near log-marginal size where lam * cost is
large (unshifted, a constant float32 cost of 1e8 gave a plan summing to 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _col_update_kernel(cost_ptr, f_ptr, g_ptr, log_b_ptr, active_ptr, N, K, lam,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    batch = tl.program_id(1)
    if tl.load(active_ptr + batch) == 0:
        return
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    base = cost_ptr + batch.to(tl.int64) * N * K
    f_base = f_ptr + batch.to(tl.int64) * N
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32).to(f_ptr.dtype.element_ty)
    s = tl.zeros((BLOCK_K,), f_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        c = tl.load(base + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        fi = tl.load(f_base + rows, mask=row_mask, other=0.0)
        x = fi[:, None] - lam * c
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), axis=0)
        m = m_new
    log_b = tl.load(log_b_ptr + batch.to(tl.int64) * K + cols, mask=col_mask, other=0.0)
    s = tl.where(col_mask, s, 1.0)
    m = tl.where(col_mask, m, 0.0)
    tl.store(g_ptr + batch.to(tl.int64) * K + cols, log_b - (m + tl.log(s)), mask=col_mask)


@triton.jit
def _row_update_kernel(cost_ptr, f_ptr, g_ptr, a_ptr, f_new_ptr, err_ptr, active_ptr, N, K, lam,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    batch = tl.program_id(1)
    if tl.load(active_ptr + batch) == 0:
        return
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    base = cost_ptr + batch.to(tl.int64) * N * K
    g_base = g_ptr + batch.to(tl.int64) * K
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32).to(f_ptr.dtype.element_ty)
    s = tl.zeros((BLOCK_N,), f_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        c = tl.load(base + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        gj = tl.load(g_base + cols, mask=col_mask, other=0.0)
        x = gj[None, :] - lam * c
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)
    offs = batch.to(tl.int64) * N + rows
    f = tl.load(f_ptr + offs, mask=row_mask, other=0.0)
    a = tl.load(a_ptr + offs, mask=row_mask, other=1.0)
    tl.store(err_ptr + offs, tl.abs(tl.exp(f + lse) - a), mask=row_mask)
    tl.store(f_new_ptr + offs, tl.log(a) - lse, mask=row_mask)


@triton.jit
def _plan_kernel(cost_ptr, f_ptr, g_ptr, plan_ptr, N, K, lam, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    batch = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    offs = batch.to(tl.int64) * N * K + rows[:, None].to(tl.int64) * K + cols[None, :]
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0)
    f = tl.load(f_ptr + batch.to(tl.int64) * N + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + batch.to(tl.int64) * K + cols, mask=col_mask, other=0.0)
    tl.store(plan_ptr + offs, tl.exp(f[:, None] + g[None, :] - lam * c), mask=mask)


def _blocks(n: int, k: int, interpreted: bool) -> tuple[int, int]:
    # The interpreter pays per program, so it gets large blocks; a GPU gets register-friendly tiles.
    cap_n, cap_k = (256, 256) if interpreted else (64, 128)
    return min(cap_n, triton.next_power_of_2(max(n, 16))), min(cap_k, triton.next_power_of_2(max(k, 16)))


def launch(cost: torch.Tensor, lam: float, a: torch.Tensor, b: torch.Tensor, max_iter: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments and results as ``sinkhorn_ref``: cost (B, N, K) float32/float64, a (B, N), b (B, K) float64."""
    cost = (cost.double() - cost.double().amin(dim=2, keepdim=True)).to(cost.dtype).contiguous()
    batch, n, k = cost.shape
    dtype, device = cost.dtype, cost.device
    block_n, block_k = _blocks(n, k, device.type == "cpu")
    a_c = a.to(dtype).contiguous()
    log_b = b.log().to(dtype).contiguous()
    f = torch.zeros(batch, n, dtype=dtype, device=device)
    g = torch.zeros(batch, k, dtype=dtype, device=device)
    f_new = torch.empty_like(f)
    err_rows = torch.empty_like(f)
    active = torch.ones(batch, dtype=torch.int32, device=device)
    row_grid = (triton.cdiv(n, block_n), batch)
    col_grid = (triton.cdiv(k, block_k), batch)

    def row_update():
        _row_update_kernel[row_grid](cost, f, g, a_c, f_new, err_rows, active, n, k, lam,
                                     BLOCK_N=block_n, BLOCK_K=block_k)

    row_update()
    f.copy_(f_new)
    n_iter = torch.zeros(batch, dtype=torch.int64)
    err = torch.full((batch,), float("inf"), dtype=torch.float64)
    running = torch.ones(batch, dtype=torch.bool)
    for it in range(1, max_iter + 1):
        _col_update_kernel[col_grid](cost, f, g, log_b, active, n, k, lam, BLOCK_N=block_n, BLOCK_K=block_k)
        row_update()
        e = err_rows.double().sum(dim=1).cpu()
        err = torch.where(running, e, err)
        n_iter = torch.where(running, torch.full_like(n_iter, it), n_iter)
        stop = running & ((e <= tol) | (it == max_iter))
        keep = (running & ~stop).to(device)
        f = torch.where(keep[:, None], f_new, f)
        running &= ~stop
        active.copy_(running.to(torch.int32))
        if not bool(running.any()):
            break
    plan = torch.empty_like(cost)
    _plan_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k), batch)](cost, f, g, plan, n, k, lam,
                                                                           BLOCK_N=block_n, BLOCK_K=block_k)
    return plan, n_iter.to(device), err.to(device)
