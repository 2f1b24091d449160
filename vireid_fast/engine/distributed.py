"""torch.distributed helpers: start from torchrun's environment, gather features in dataset order, broadcast labels,
and an all-gather that passes gradients back (so every rank can compute the loss over the global batch)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's indices of 0..n-1 (strided)."""
    return list(range(rank, n, world))


def assemble(local: torch.Tensor, indices: list[int], n: int) -> torch.Tensor:
    """Rows ``local`` at ``indices`` of an (n, ...) tensor, summed over ranks (disjoint shards, so exact)."""
    full = torch.zeros((n,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    if indices:
        full[torch.as_tensor(indices, device=local.device)] = local
    if active():
        dist.all_reduce(full)
    return full


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of ``module`` (BatchNorm running statistics, counters) from rank ``src`` to all ranks: each rank's
    training forwards update them with its own batches, and extraction must use one set of statistics."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; all-reduce then take this rank's slice
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks in rank order (identity in a single process); differentiable for float tensors.
    Every rank must pass the same number of rows."""
    if not active():
        return x
    if x.is_floating_point() and x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
