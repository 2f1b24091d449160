"""cluster-contrast's ``ClusterMemory`` as a drop-in over the fused ``vireid::memory_contrastive`` op."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..memory._function import MemoryLogits
from ..ops.memory_contrastive import memory_contrastive, memory_update

__all__ = ["ClusterMemory", "live_buffer", "logits_with_update"]


def live_buffer(module: nn.Module, name: str = "features") -> torch.Tensor:
    """The buffer ``name`` as a float32 contiguous tensor the update can mutate in place.

    A buffer assigned in another dtype or layout (or requiring grad) is replaced by a converted copy first.
    """
    buf = getattr(module, name)
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.requires_grad:
        buf = buf.detach().float().contiguous()
        setattr(module, name, buf)
    return buf


def logits_with_update(inputs: torch.Tensor, targets: torch.Tensor | None, memory: torch.Tensor, momentum: float,
                       update: str = "sequential", order: Callable[[int], torch.Tensor] | None = None,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """``normalize(inputs) @ memory.T`` (B, C); its backward gives the gradient with ``memory`` as it was, then updates
    ``memory`` in place (the community ``CM`` pattern). ``targets=None`` or ``update="none"``: no update.

    ``order(B)``: called when the update runs, returns a (B,) permutation the sequential update then follows (SALCR
    draws it with ``torch.randperm`` at that moment). ``weight``: (B,) factors applied to the samples before the
    update (``m <- normalize(μ m + (1 - μ) w x)``, SALCR's weighted memory).
    """
    x = F.normalize(inputs.to(memory.device), dim=1)
    if targets is None or update == "none":
        return MemoryLogits.apply(x, memory, None)
    targets = targets.to(memory.device)

    def step(xd: torch.Tensor) -> None:
        if weight is not None:
            xd = xd * weight.to(xd)[:, None]
        xs, ts = xd, targets
        if order is not None:
            perm = order(xd.shape[0]).to(xd.device)
            xs, ts = xd[perm], targets[perm]
        memory_update(xs.to(memory.dtype), ts, memory, momentum=momentum, update=update, normalized=True)

    return MemoryLogits.apply(x, memory, step)


class MemoryBank(nn.Module):
    """The constructor and attributes every community memory shares: ``num_features`` (D), ``num_samples`` (C),
    ``temp``, ``momentum``, ``use_hard`` and the (C, D) float32 buffer ``features`` (zeros until a script assigns
    the epoch's centres)."""

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__()
        self.num_features = num_features
        self.num_samples = num_samples
        self.momentum = momentum
        self.temp = temp
        self.use_hard = use_hard
        self.register_buffer("features", torch.zeros(num_samples, num_features))


class ClusterMemory(MemoryBank):
    """Cluster-level memory with the community's constructor, buffer and ``forward`` (spec: cluster_memory.md).

    Args:
        num_features: D, the feature dimension.
        num_samples: C, the number of clusters (rows of ``features``).
        temp: temperature of the logits.
        momentum: μ of the update ``m <- normalize(μ m + (1 - μ) x)`` (the scripts pass 0.1).
        use_hard: False — the per-sample sequential update of cluster-contrast; True — cm_hard (PGM stage 2), one
            update per label with its member least similar to the prototype.

    ``features`` is a (C, D) float32 buffer; training scripts reassign it every epoch
    (``memory.features = F.normalize(centres, dim=1).cuda()``), which simply replaces the buffer (any C). The loss
    is computed by one fused op; its backward gives the gradient w.r.t. the un-normalised inputs with the memory
    before the update, then updates ``features`` in place. A buffer assigned in another dtype or layout is converted
    to a contiguous float32 buffer on the next forward (a copy — the update then lands in the converted buffer).
    """

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, momentum: float) -> torch.Tensor:
        features = live_buffer(self)
        if inputs.device != features.device:
            inputs = inputs.to(features.device)  # the community moves inputs to the GPU with .cuda()
        return memory_contrastive(inputs, targets.to(features.device), features, temp=self.temp,
                                  momentum=momentum, update="hard" if self.use_hard else "sequential")

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """inputs (B, D) un-normalised features, targets (B,) cluster labels -> mean cross-entropy loss ()."""
        return self._loss(inputs, targets, self.momentum)
