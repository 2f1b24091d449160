"""Instance memory with a positive-set contrastive loss (SALCR GPCR, HIL neighbour contrastive learning)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.memory_contrastive import memory_update
from ._function import MemoryLogits, check_memory_inputs

__all__ = ["InstanceMemory", "positive_set_loss", "positives_from_csr"]


def positives_from_csr(offsets: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
    """CSR positive sets (``offsets`` (B+1,), ``indices`` (nnz,)) -> padded (B, K) int64 with -1 padding."""
    if offsets.dim() != 1 or offsets.numel() != batch + 1 or indices.dim() != 1:
        raise ValueError(f"CSR positives need offsets (B+1,) = ({batch + 1},) and indices (nnz,), got "
                         f"{tuple(offsets.shape)} and {tuple(indices.shape)}")
    offsets = offsets.to(torch.int64)
    counts = offsets[1:] - offsets[:-1]
    if bool((counts < 0).any()) or int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel():
        raise ValueError("CSR offsets must start at 0, be non-decreasing and end at len(indices)")
    width = max(int(counts.max()), 1)
    rows = torch.repeat_interleave(torch.arange(batch, device=indices.device), counts)
    cols = torch.arange(indices.numel(), device=indices.device) - offsets[:-1][rows]
    padded = torch.full((batch, width), -1, dtype=torch.int64, device=indices.device)
    padded[rows, cols] = indices.to(torch.int64)
    return padded


def positive_set_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``mean_b -log(sum_{i in P_b} exp(l_bi) / sum_j exp(l_bj))`` for padded positive sets (B, K), -1 = padding."""
    valid = positives >= 0
    picked = logits.gather(1, positives.clamp_min(0)).masked_fill(~valid, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(picked, dim=1)).mean()


class InstanceMemory(nn.Module):
    """Instance memory ``features`` (N, D): one L2-normalised entry per training image.

    Loss (SALCR Eq. 18–19; HIL Eq. 14–16 with P = the reliable neighbours R and the rest W as negatives):
    ``L = -1/B sum_b log( sum_{i in P_b} exp(m_i . f_b / τ) / sum_{j < N} exp(m_j . f_b / τ) )`` with
    ``f_b = normalize(inputs_b)``. The positive sets P_b (e.g. the intersection of k-NN sets, SALCR Eq. 16–17) are
    given either padded — ``positives`` (B, K) int64, -1 for padding — or as CSR — ``positives`` (nnz,) with
    ``positive_offsets`` (B+1,). Each set must be non-empty and hold distinct indices in [0, N).

    Update (backward): ``features[indices_b] <- normalize(μ features[indices_b] + (1 - μ) f_b)`` in batch order
    (μ = 0.9 in HIL), via :func:`vireid_fast.ops.memory_update`.

    forward(inputs (B, D), indices (B,) int64 dataset indices, positives, positive_offsets=None) -> loss ().
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.9):
        super().__init__()
        if not temp > 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need temp > 0 and momentum in [0, 1), got temp={temp}, momentum={momentum}")
        self.num_features, self.temp, self.momentum = num_features, temp, momentum
        self.register_buffer("features", torch.zeros(num_samples, num_features))

    def _update(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        memory_update(x, indices, self.features, momentum=self.momentum, update="sequential", normalized=True)

    def forward(self, inputs: torch.Tensor, indices: torch.Tensor, positives: torch.Tensor,
                positive_offsets: torch.Tensor | None = None) -> torch.Tensor:
        size = self.features.shape[0]
        indices = check_memory_inputs(inputs, indices, self.num_features, size, name="indices")
        if not isinstance(positives, torch.Tensor) or positives.is_floating_point():
            raise TypeError("positives must be an integer torch.Tensor")
        positives = positives.to(device=inputs.device, dtype=torch.int64)
        if positive_offsets is not None:
            positives = positives_from_csr(positive_offsets.to(inputs.device), positives, inputs.shape[0])
        elif positives.dim() != 2 or positives.shape[0] != inputs.shape[0]:
            raise ValueError(f"padded positives must be (B, K) with B = {inputs.shape[0]}, got "
                             f"{tuple(positives.shape)}; pass positive_offsets for CSR sets")
        if not torch.compiler.is_compiling():
            if bool((positives >= size).any()) or bool((positives < -1).any()):
                raise ValueError(f"positive indices must lie in [0, {size}) (-1 = padding)")
            if bool(((positives >= 0).sum(1) == 0).any()):
                raise ValueError("every sample needs a non-empty positive set (-log 0 is infinite); include the "
                                 "sample's own index")
        x = F.normalize(inputs.to(self.features.dtype), dim=1)
        logits = MemoryLogits.apply(x, self.features, partial(self._update, indices=indices)) / self.temp
        return positive_set_loss(logits, positives)
