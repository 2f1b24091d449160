"""Memory-bank contrastive loss in Triton: fused forward, backward, and the per-label memory update.

* ``_forward_kernel`` — one program per (row block, column block) tile: the row norms, ``x . m`` by ``tl.dot`` over
  D-blocks, and the tile's softmax partials (max, rescaled sum of exponentials, target logit, soft-target sums); the
  launcher merges the partials of the column blocks (the max-rescaled, "online" log-sum-exp combination), which
  gives B/BLOCK_B x C/BLOCK_C programs instead of B/BLOCK_B. The logits are written once (the backward reuses
  them).
* ``_grad_kernel`` — grad_x = ((softmax * sum t - t) * scale) @ memory for a block of rows and a D-block, the
  softmax recomputed from the saved logits and log-sum-exp.
* ``_rows_kernel`` — the normalisation Jacobian per row; also writes the normalised rows for the update.
* ``_update_kernel`` — one program per distinct label, walking that label's members in batch order (sequential), or
  choosing the least similar member (hard) or the mean (mean); the row stays in registers (BLOCK_D >= D).

Matrix products use ``input_precision="ieee"`` (no TF32) so that results match the float32 reference. Same semantics
as ``vireid_fast.ops.reference.memory_contrastive_ref`` / ``memory_contrastive_backward_ref``; float64 memory (used for
gradient checks) is delegated to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vireid_fast.ops.reference import (
    memory_contrastive_backward_ref,
    memory_contrastive_ref,
    memory_update_ref,
)

_MODES = {"sequential": 0, "hard": 1, "mean": 2}


@triton.jit
def _forward_kernel(x_ptr, mem_ptr, y_ptr, soft_ptr, logits_ptr, part_ptr, B, C, D, inv_temp, NUM_CB,
                    HAS_SOFT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # One (row block, column block) tile of the logits; per row it leaves five partials of the softmax/CE in
    # part[k, row, column block]: max, sum exp(logit - max), target logit, sum t*logit, sum t.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    labels = tl.load(y_ptr + rows, mask=row_mask, other=0)
    # row norms (F.normalize: divide by max(norm, 1e-12))
    sumsq = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        xm = row_mask[:, None] & (dims[None, :] < D)
        x = tl.load(x_ptr + rows64[:, None] * D + dims[None, :], mask=xm, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        x = tl.load(x_ptr + rows64[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :],
                    other=0.0).to(tl.float32)
        m = tl.load(mem_ptr + cols.to(tl.int64)[None, :] * D + dims[:, None],
                    mask=col_mask[None, :] & dim_mask[:, None], other=0.0)
        acc += tl.dot(x * inv_norm[:, None], m, input_precision="ieee")
    logit = acc * inv_temp
    valid = row_mask[:, None] & col_mask[None, :]
    tl.store(logits_ptr + rows64[:, None] * C + cols[None, :], logit, mask=valid)
    logit = tl.where(col_mask[None, :], logit, float("-inf"))
    tile_max = tl.max(logit, axis=1)
    tile_sum = tl.sum(tl.exp(logit - tile_max[:, None]), axis=1)
    is_target = (cols[None, :] == labels[:, None]) & col_mask[None, :]
    target_logit = tl.sum(tl.where(is_target, logit, 0.0), axis=1)
    stride = B * NUM_CB
    base = part_ptr + rows64 * NUM_CB + pid_c
    tl.store(base, tile_max, mask=row_mask)
    tl.store(base + stride, tile_sum, mask=row_mask)
    tl.store(base + 2 * stride, target_logit, mask=row_mask)
    if HAS_SOFT:
        t = tl.load(soft_ptr + rows64[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        tl.store(base + 3 * stride, tl.sum(t * tl.where(col_mask[None, :], logit, 0.0), axis=1), mask=row_mask)
        tl.store(base + 4 * stride, tl.sum(t, axis=1), mask=row_mask)


@triton.jit
def _grad_kernel(logits_ptr, lse_ptr, y_ptr, soft_ptr, mem_ptr, grad_loss_ptr, out_ptr, B, C, D, inv_bt,
                 HAS_SOFT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    labels = tl.load(y_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_bt  # read on the device: no host sync
    mass = tl.full((BLOCK_B,), 1.0, tl.float32)
    if HAS_SOFT:
        mass = tl.zeros((BLOCK_B,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_mask[:, None] & (cols[None, :] < C)
            mass += tl.sum(tl.load(soft_ptr + rows64[:, None] * C + cols[None, :], mask=valid, other=0.0), axis=1)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        valid = row_mask[:, None] & col_mask[None, :]
        logit = tl.load(logits_ptr + rows64[:, None] * C + cols[None, :], mask=valid, other=float("-inf"))
        prob = tl.exp(logit - lse[:, None])
        if HAS_SOFT:
            t = tl.load(soft_ptr + rows64[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        else:
            t = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        g = tl.where(valid, (prob * mass[:, None] - t) * scale, 0.0)
        m = tl.load(mem_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        acc += tl.dot(g, m, input_precision="ieee")
    tl.store(out_ptr + rows64[:, None] * D + dims[None, :], acc, mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def _rows_kernel(x_ptr, g_ptr, xn_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sumsq = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * D + dims, mask=dims < D, other=0.0).to(tl.float32)
        sumsq += x * x
    norm = tl.sqrt(tl.sum(sumsq, axis=0))
    denom = tl.maximum(norm, 1e-12)
    dot = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = dims < D
        xn = tl.load(x_ptr + row * D + dims, mask=mask, other=0.0).to(tl.float32) / denom
        tl.store(xn_ptr + row * D + dims, xn, mask=mask)
        dot += xn * tl.load(g_ptr + row * D + dims, mask=mask, other=0.0)
    total = tl.sum(dot, axis=0)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = dims < D
        xn = tl.load(xn_ptr + row * D + dims, mask=mask, other=0.0)
        g = tl.load(g_ptr + row * D + dims, mask=mask, other=0.0)
        grad = tl.where(norm > 1e-12, (g - xn * total) / denom, g / 1e-12)
        tl.store(out_ptr + row * D + dims, grad, mask=mask)


@triton.jit
def _update_kernel(xn_ptr, order_ptr, starts_ptr, labels_ptr, mem_ptr, D, mu, one_minus,
                   MODE: tl.constexpr, BLOCK_D: tl.constexpr):
    group = tl.program_id(0)
    first = tl.load(starts_ptr + group)
    last = tl.load(starts_ptr + group + 1)
    label = tl.load(labels_ptr + group).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < D
    m = tl.load(mem_ptr + label * D + dims, mask=mask, other=0.0)
    if MODE == 0:  # sequential: every member in batch order, renormalised after each step
        for k in range(first, last):
            i = tl.load(order_ptr + k).to(tl.int64)
            x = tl.load(xn_ptr + i * D + dims, mask=mask, other=0.0)
            v = m * mu + one_minus * x
            sq = tl.sum(v * v, axis=0)
            m = tl.where(sq > 0, v / tl.sqrt(sq), m)  # a zero-norm step keeps the row (never 0/0)
    else:
        if MODE == 1:  # hard: the member least similar to the current prototype (first one on ties)
            best = tl.load(order_ptr + first).to(tl.int64)
            best_sim = float("inf")
            for k in range(first, last):
                i = tl.load(order_ptr + k).to(tl.int64)
                sim = tl.sum(tl.load(xn_ptr + i * D + dims, mask=mask, other=0.0) * m, axis=0)
                take = sim < best_sim
                best = tl.where(take, i, best)
                best_sim = tl.where(take, sim, best_sim)
            chosen = tl.load(xn_ptr + best * D + dims, mask=mask, other=0.0)
        else:  # mean of the members
            chosen = tl.zeros((BLOCK_D,), tl.float32)
            for k in range(first, last):
                i = tl.load(order_ptr + k).to(tl.int64)
                chosen += tl.load(xn_ptr + i * D + dims, mask=mask, other=0.0)
            chosen = chosen / (last - first).to(tl.float32)
        v = m * mu + one_minus * chosen
        sq = tl.sum(v * v, axis=0)
        m = tl.where(sq > 0, v / tl.sqrt(sq), m)  # a zero-norm step keeps the row (never 0/0)
    tl.store(mem_ptr + label * D + dims, m, mask=mask)


def _blocks(batch: int, classes: int, dim: int, max_block_d: int) -> tuple[int, int, int]:
    # fp32 operand tiles of at most 64 x max_block_d per stage keep the pipelined shared memory of tl.dot within the
    # budget of consumer GPUs (~100 KB)
    block_b = max(16, min(64, triton.next_power_of_2(batch)))
    block_c = max(16, min(64, triton.next_power_of_2(classes)))
    block_d = max(16, min(max_block_d, triton.next_power_of_2(dim)))
    return block_b, block_c, block_d


def launch(inputs: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, soft_targets: torch.Tensor | None,
           temp: float, momentum: float, update: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of ``vireid::memory_contrastive``: (loss (), logits (B, C), lse (B,)) in float32."""
    if memory.dtype != torch.float32:
        return memory_contrastive_ref(inputs, targets, memory, soft_targets, temp, momentum, update)
    batch, dim = inputs.shape
    classes = memory.shape[0]
    x = inputs.contiguous()
    mem = memory.contiguous()
    logits = torch.empty((batch, classes), dtype=torch.float32, device=x.device)
    soft = soft_targets.to(torch.float32).contiguous() if soft_targets is not None else x
    block_b, block_c, block_d = _blocks(batch, classes, dim, 32)
    num_cb = triton.cdiv(classes, block_c)
    parts = torch.zeros((5, batch, num_cb), dtype=torch.float32, device=x.device)
    _forward_kernel[(triton.cdiv(batch, block_b), num_cb)](
        x, mem, targets.contiguous(), soft, logits, parts, batch, classes, dim, 1.0 / temp, num_cb,
        HAS_SOFT=soft_targets is not None, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d)
    # combine the column-block partials: log-sum-exp of log-sum-exps, then the loss per row
    tile_max, tile_sum, target_logit, soft_dot, soft_mass = parts.unbind(0)
    row_max = tile_max.max(dim=1).values
    lse = row_max + torch.log((tile_sum * torch.exp(tile_max - row_max[:, None])).sum(1))
    if soft_targets is None:
        per_sample = lse - target_logit.sum(1)
    else:
        per_sample = lse * soft_mass.sum(1) - soft_dot.sum(1)
    return per_sample.sum() / batch, logits, lse


def launch_update(normalized: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, momentum: float,
                  update: str) -> None:
    """``vireid::memory_update``: in place on ``memory``, one program per distinct label."""
    if update == "none":
        return
    if update not in _MODES:
        raise ValueError(f"update must be sequential, hard, mean or none, got {update!r}")
    if memory.dtype != torch.float32:
        memory_update_ref(normalized.to(memory.dtype), targets, memory, momentum, update)
        return
    dim = memory.shape[1]
    xn = normalized.to(torch.float32).contiguous()
    order = torch.argsort(targets, stable=True)
    labels, counts = torch.unique_consecutive(targets[order], return_counts=True)
    starts = torch.zeros(labels.numel() + 1, dtype=torch.int64, device=targets.device)
    starts[1:] = torch.cumsum(counts, 0)
    # scalars rounded to float32 like the community's float32 tensor arithmetic
    mu = float(torch.tensor(momentum, dtype=torch.float32))
    one_minus = float(torch.tensor(1.0 - momentum, dtype=torch.float32))
    _update_kernel[(labels.numel(),)](xn, order, starts, labels, memory, dim, mu, one_minus,
                                      MODE=_MODES[update], BLOCK_D=triton.next_power_of_2(dim))


def launch_backward(grad_loss: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor,
                    soft_targets: torch.Tensor | None, logits: torch.Tensor, lse: torch.Tensor, temp: float,
                    momentum: float, update: str) -> torch.Tensor:
    """Backward of ``vireid::memory_contrastive``: grad_inputs (B, D), then ``memory`` updated in place."""
    if memory.dtype != torch.float32:
        return memory_contrastive_backward_ref(grad_loss, inputs, targets, memory, soft_targets, logits, lse, temp,
                                               momentum, update)
    batch, dim = inputs.shape
    classes = memory.shape[0]
    x = inputs.contiguous()
    soft = soft_targets.to(torch.float32).contiguous() if soft_targets is not None else logits
    block_b, block_c, block_d = _blocks(batch, classes, dim, 64)
    grad_x = torch.empty((batch, dim), dtype=torch.float32, device=x.device)
    _grad_kernel[(triton.cdiv(batch, block_b), triton.cdiv(dim, block_d))](
        logits.contiguous(), lse.contiguous(), targets.contiguous(), soft, memory, grad_loss.reshape(1), grad_x,
        batch, classes, dim, 1.0 / (batch * temp),
        HAS_SOFT=soft_targets is not None, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d)
    xn = torch.empty((batch, dim), dtype=torch.float32, device=x.device)
    grad_inputs = torch.empty((batch, dim), dtype=torch.float32, device=x.device)
    _rows_kernel[(batch,)](x, grad_x, xn, grad_inputs, dim, BLOCK_D=min(1024, triton.next_power_of_2(dim)))
    launch_update(xn, targets, memory, momentum, update)
    return grad_inputs.to(inputs.dtype)
