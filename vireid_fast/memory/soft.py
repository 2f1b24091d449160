"""Soft and sharpened targets for memory losses: MULT soft labels and OCLR cross-memory label refinement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.memory_contrastive import memory_contrastive

__all__ = ["mult_soft_labels", "oclr_loss", "sharpened_targets"]


def mult_soft_labels(scores: torch.Tensor, beta: float = 0.7) -> torch.Tensor:
    """MULT soft labels ``y = β onehot(argmax ỹ) + (1 - β) ỹ`` (β = 0.7).

    Args:
        scores: (B, C) label distribution ỹ (rows summing to 1, e.g. the transferred labels of MULT).
    Returns:
        (B, C) rows summing to 1, in scores' dtype.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, C), got {tuple(scores.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    onehot = F.one_hot(scores.argmax(1), scores.shape[1]).to(scores.dtype)
    return beta * onehot + (1.0 - beta) * scores


def sharpened_targets(features: torch.Tensor, memory: torch.Tensor, temp: float = 0.05,
                      sharpen: float = 5.0) -> torch.Tensor:
    """``P(f | M, τ / sharpen) = softmax(normalize(f) M^T / (τ / sharpen))``: (B, C), differentiable w.r.t. features."""
    if not temp > 0 or not sharpen > 0:
        raise ValueError(f"temp and sharpen must be > 0, got {temp}, {sharpen}")
    x = F.normalize(features.to(memory.dtype), dim=1)
    return torch.softmax(x.mm(memory.t()) / (temp / sharpen), dim=1)


def oclr_loss(features: torch.Tensor, memory: torch.Tensor, target_memory: torch.Tensor, temp: float = 0.05,
              sharpen: float = 5.0, detach_target: bool = False) -> torch.Tensor:
    """One OCLR term (MULT Eq. 19): ``CE(P(f | M_a, τ), P(f | M_t, τ / 5))`` averaged over the batch.

    The prediction is the softmax over ``memory`` (M_a) at τ; the target the sharpened softmax over
    ``target_memory`` (M̃_v or M̂_r) at τ / ``sharpen``. ``detach_target=False`` (default) matches the official code,
    where the target is not detached, so the features also receive the target's gradient; pass True to treat the
    target as a constant. Neither memory is updated (the cluster memories update in their own losses).

    Args:
        features: (B, D) un-normalised features. memory, target_memory: (C, D) float32 L2-normalised prototypes
        sharing the label space.
    """
    if memory.shape != target_memory.shape:
        raise ValueError(f"memory and target_memory must share (C, D), got {tuple(memory.shape)} and "
                         f"{tuple(target_memory.shape)}")
    target = sharpened_targets(features, target_memory, temp, sharpen)
    if detach_target:
        target = target.detach()
    labels = target.detach().argmax(1)  # unused by update="none"; required by the op's signature
    return memory_contrastive(features, labels, memory, temp=temp, update="none", soft_targets=target)
