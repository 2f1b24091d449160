"""Shared autograd piece of the memory variants: logits against a buffer, the buffer updated during backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class MemoryLogits(torch.autograd.Function):
    """``x @ memory.T`` whose backward returns ``grad @ memory`` (memory before the update), then calls ``update``.

    ``x``: (B, D) L2-normalised features; ``memory``: (R, D) buffer (no gradient); ``update(x_detached)`` mutates the
    buffer in place. This is the community's pattern (cluster-contrast's ``CM``) with the update supplied by the
    variant. As with the fused op, the update happens only if backward runs.
    """

    @staticmethod
    def forward(ctx, x, memory, update: Callable[[torch.Tensor], None] | None):
        ctx.save_for_backward(x)
        ctx.memory = memory  # live buffer, not a saved copy (see vireid_fast.ops.memory_contrastive)
        ctx.update = update
        return x.mm(memory.t())

    @staticmethod
    def backward(ctx, grad_logits):
        (x,) = ctx.saved_tensors
        grad_x = grad_logits.mm(ctx.memory) if ctx.needs_input_grad[0] else None
        if ctx.update is not None:
            with torch.no_grad():
                ctx.update(x.detach())
        return grad_x, None, None


def check_memory_inputs(inputs: torch.Tensor, targets: torch.Tensor | None, dim: int, classes: int | None,
                        name: str = "targets") -> torch.Tensor | None:
    """Shape/dtype/range checks shared by the variant modules (ValueError/TypeError naming the argument)."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError("inputs must be a floating-point torch.Tensor of shape (B, D)")
    if inputs.dim() != 2 or inputs.shape[1] != dim or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be (B, {dim}) with B >= 1, got {tuple(inputs.shape)}")
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor")
    if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"{name} must be (B,) = ({inputs.shape[0]},), got {tuple(targets.shape)}")
    targets = targets.to(device=inputs.device, dtype=torch.int64)
    if classes is not None and not torch.compiler.is_compiling():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= classes:
            raise ValueError(f"{name} must lie in [0, {classes}), got values in [{lo}, {hi}]")
    return targets


def momentum_step_(memory: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, momentum: float) -> None:
    """``memory[r] <- normalize(momentum memory[r] + (1 - momentum) v)`` for distinct ``rows`` at once."""
    memory[rows] = F.normalize(memory[rows] * momentum + (1.0 - momentum) * values, dim=1)


def first_argmin_per_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Index (into ``values``) of the smallest value of each group, the first in order on ties: (num_groups,)."""
    big = torch.finfo(values.dtype).max
    minima = torch.full((num_groups,), big, dtype=values.dtype, device=values.device)
    minima = minima.scatter_reduce(0, groups, values, reduce="amin")
    positions = torch.arange(values.shape[0], device=values.device)
    candidates = torch.where(values == minima[groups], positions, values.shape[0])
    first = torch.full((num_groups,), values.shape[0], dtype=torch.int64, device=values.device)
    return first.scatter_reduce(0, groups, candidates, reduce="amin")


def lowest_k_mean_per_group(x: torch.Tensor, values: torch.Tensor, groups: torch.Tensor, num_groups: int,
                            k: int) -> torch.Tensor:
    """(num_groups, D) mean of the rows of ``x`` (B, D) holding the k smallest ``values`` of each group (all of the
    group's rows if it has fewer; first in batch order on ties). k = 1 is exactly the row of
    :func:`first_argmin_per_group`."""
    if k == 1:
        return x[first_argmin_per_group(values, groups, num_groups)]
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]  # by group, then value, then batch position
    sorted_groups = groups[order]
    starts = torch.searchsorted(sorted_groups, torch.arange(num_groups, device=groups.device))
    rank = torch.arange(order.numel(), device=groups.device) - starts[sorted_groups]
    keep = order[rank < k]
    sums = torch.zeros(num_groups, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, groups[keep], x[keep])
    counts = torch.bincount(groups[keep], minlength=num_groups).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]
