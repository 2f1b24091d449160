"""Momentum (EMA) encoder: PCLHD Eq. 16, theta_m <- beta theta_m + (1 - beta) theta, beta = 0.999."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAEncoder(nn.Module):
    """A frozen copy of ``model`` whose parameters follow ``model`` by exponential moving average.

    ``update(model)`` after each optimiser step: parameters ``p_m <- beta p_m + (1 - beta) p``; buffers (BN running
    statistics) are copied unless ``copy_buffers=False`` (PCLHD: the momentum encoder keeps the statistics of its own
    train-mode forwards). ``forward`` runs the averaged copy (no gradients).
    """

    def __init__(self, model: nn.Module, beta: float = 0.999, copy_buffers: bool = True):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.copy_buffers = bool(copy_buffers)
        self.module = copy.deepcopy(_unwrap(model))
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = _unwrap(model)
        for mine, theirs in zip(self.module.parameters(), source.parameters(), strict=True):
            mine.mul_(self.beta).add_(theirs.detach(), alpha=1.0 - self.beta)
        if self.copy_buffers:
            for mine, theirs in zip(self.module.buffers(), source.buffers(), strict=True):
                mine.copy_(theirs)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
