"""SWPCL soft-weight prototypes (only the paper's abstract is public: every concrete choice is stated here)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.memory_contrastive import memory_update
from ._function import MemoryLogits, check_memory_inputs

__all__ = ["SoftWeightPrototypeMemory"]


class SoftWeightPrototypeMemory(nn.Module):
    """Soft prototypes with soft weights and a progressive schedule, after SWPCL's abstract.

    What the abstract states: the soft prototypes (SP) of a cluster are the nearest-neighbour samples of its centroid
    prototype; each gets a soft weight (SW) measuring its correlation with the centroid; they enter the contrastive
    loss through the weights; a progressive strategy shifts the focus to reliable soft prototypes.

    Choices made here (not from the paper, whose body is not public):

    * :meth:`build` (once per epoch): centroid ``μ_c = normalize(mean of the normalised member features)`` (labels < 0
      are outliers, clusters in sorted label order); the soft prototypes are the ``num_prototypes`` members with the
      largest cosine similarity to ``μ_c`` (all members if fewer), stored normalised; their raw weights are those
      similarities, clamped to at least 1e-6.
    * Weights: ``ŵ_ck = w_ck^γ / Σ_k' w_ck'^γ`` over the cluster's prototypes, with ``γ = 1 + (max_sharpness - 1) p``
      for the training progress ``p ∈ [0, 1]`` set by :meth:`set_progress` — γ = 1 gives weights proportional to the
      similarity, a larger γ concentrates them on the prototypes closest to the centroid.
    * Loss: ``-1/B Σ_b Σ_k ŵ_{y_b k} log softmax_{(c, k)}(x_b . p_ck / τ)`` — a weighted sum of InfoNCE terms whose
      softmax runs over every soft prototype of every cluster.
    * Update (backward): a prototype that is the memory entry of a sample in the batch (``indices`` given to forward
      are dataset indices) gets ``normalize(μ p + (1 - μ) x)``, in batch order; other prototypes stay until the next
      :meth:`build`.

    Buffers: ``prototypes`` (C, K, D), ``weights`` (C, K) raw similarities (0 = padding), ``prototype_index`` (C, K)
    dataset indices (-1 = padding), ``row_of_index`` (N,) flattened prototype row of each dataset index or -1.
    """

    def __init__(self, num_features: int, num_prototypes: int = 4, temp: float = 0.05, momentum: float = 0.2,
                 max_sharpness: float = 4.0):
        super().__init__()
        if num_prototypes < 1 or not temp > 0 or not 0.0 <= momentum < 1.0 or not max_sharpness >= 1.0:
            raise ValueError("need num_prototypes >= 1, temp > 0, momentum in [0, 1) and max_sharpness >= 1")
        self.num_features, self.num_prototypes = num_features, num_prototypes
        self.temp, self.momentum, self.max_sharpness = temp, momentum, max_sharpness
        self.sharpness = 1.0
        self.register_buffer("prototypes", torch.zeros(0, num_prototypes, num_features))
        self.register_buffer("weights", torch.zeros(0, num_prototypes))
        self.register_buffer("prototype_index", torch.zeros(0, num_prototypes, dtype=torch.int64))
        self.register_buffer("row_of_index", torch.zeros(0, dtype=torch.int64))

    def set_progress(self, progress: float) -> None:
        """Training progress p in [0, 1] (e.g. epoch / epochs): sets γ = 1 + (max_sharpness - 1) p."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        self.sharpness = 1.0 + (self.max_sharpness - 1.0) * progress

    @torch.no_grad()
    def build(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Select the soft prototypes of every cluster: features (N, D), labels (N,) int, -1 = outlier."""
        check_memory_inputs(features, labels, self.num_features, None, name="labels")
        labels = labels.to(features.device, torch.int64)
        normalized = F.normalize(features.float(), dim=1)
        clusters = torch.unique(labels[labels >= 0])
        if clusters.numel() == 0:
            raise ValueError("labels hold no cluster (all are outliers < 0)")
        count, k, dim = clusters.numel(), self.num_prototypes, self.num_features
        prototypes = torch.zeros(count, k, dim, device=features.device)
        weights = torch.zeros(count, k, device=features.device)
        index = torch.full((count, k), -1, dtype=torch.int64, device=features.device)
        for row, label in enumerate(clusters.tolist()):
            members = torch.nonzero(labels == label).flatten()
            centroid = F.normalize(normalized[members].mean(0), dim=0)
            sims = normalized[members] @ centroid
            top = torch.topk(sims, min(k, members.numel())).indices
            prototypes[row, : top.numel()] = normalized[members[top]]
            weights[row, : top.numel()] = sims[top].clamp_min(1e-6)
            index[row, : top.numel()] = members[top]
        row_of_index = torch.full((features.shape[0],), -1, dtype=torch.int64, device=features.device)
        valid = index >= 0
        row_of_index[index[valid]] = torch.nonzero(valid.flatten()).flatten()
        self.prototypes, self.weights = prototypes, weights
        self.prototype_index, self.row_of_index = index, row_of_index

    def soft_weights(self) -> torch.Tensor:
        """Normalised weights ŵ (C, K) at the current sharpness (0 on padding)."""
        powered = torch.where(self.weights > 0, self.weights.clamp_min(1e-6) ** self.sharpness, 0.0)
        return powered / powered.sum(1, keepdim=True)

    def _update(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        rows = self.row_of_index[indices]
        keep = rows >= 0
        if bool(keep.any()):
            flat = self.prototypes.view(-1, self.num_features)
            memory_update(x[keep], rows[keep], flat, momentum=self.momentum, update="sequential", normalized=True)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, D), targets (B,) cluster rows in [0, C), indices (B,) dataset indices or None -> loss ()."""
        clusters = self.prototypes.shape[0]
        if clusters == 0:
            raise ValueError("call build(features, labels) before forward")
        targets = check_memory_inputs(inputs, targets, self.num_features, clusters)
        update = None
        if indices is not None:
            indices = check_memory_inputs(inputs, indices, self.num_features, self.row_of_index.shape[0],
                                          name="indices")
            update = partial(self._update, indices=indices)
        x = F.normalize(inputs.to(self.prototypes.dtype), dim=1)
        flat = self.prototypes.view(-1, self.num_features)
        logits = MemoryLogits.apply(x, flat, update) / self.temp
        logits = logits.masked_fill(~(self.weights > 0).flatten()[None, :], float("-inf"))
        log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).view(-1, clusters, self.num_prototypes)
        batch = torch.arange(x.shape[0], device=x.device)
        own = log_prob[batch, targets]
        weights = self.soft_weights()[targets]
        return -torch.where(weights > 0, weights * own, 0.0).sum(1).mean()
