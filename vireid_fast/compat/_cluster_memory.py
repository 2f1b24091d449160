"""cluster-contrast's ``ClusterMemory`` as a drop-in over the fused ``vireid::memory_contrastive`` op."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.memory_contrastive import memory_contrastive

__all__ = ["ClusterMemory"]


class ClusterMemory(nn.Module):
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

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__()
        self.num_features = num_features
        self.num_samples = num_samples
        self.momentum = momentum
        self.temp = temp
        self.use_hard = use_hard
        self.register_buffer("features", torch.zeros(num_samples, num_features))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """inputs (B, D) un-normalised features, targets (B,) cluster labels -> mean cross-entropy loss ()."""
        features = self.features
        if features.dtype != torch.float32 or not features.is_contiguous() or features.requires_grad:
            self.features = features.detach().float().contiguous()
        if inputs.device != self.features.device:
            inputs = inputs.to(self.features.device)  # the community moves inputs to the GPU with .cuda()
        return memory_contrastive(inputs, targets.to(self.features.device), self.features, temp=self.temp,
                                  momentum=self.momentum, update="hard" if self.use_hard else "sequential")
