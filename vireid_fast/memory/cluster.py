"""Multi-prototype cluster memories: PCLHD hybrid and dynamic memories, HIL multi-centre memory.

Each module keeps its prototypes in a ``features`` buffer that training scripts reassign every epoch, computes its loss
from ``normalize(inputs) @ features.T / temp``, and updates ``features`` in place during backward, after the gradient
has been taken with the buffer as it was (community semantics, see :mod:`vireid_fast.ops.memory_contrastive`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.memory_contrastive import memory_update
from ._function import MemoryLogits, check_memory_inputs, lowest_k_mean_per_group, momentum_step_

__all__ = ["DynamicMemory", "HybridMemory", "MultiCentreMemory", "multi_centre_contrast", "nearest_centre_update"]


class HybridMemory(nn.Module):
    """PCLHD hybrid memory: mean prototypes in rows [0, C), hard prototypes in rows [C, 2C) of ``features`` (2C, D).

    Losses (PCLHD, "Prototypical contrastive learning with hard and dynamic prototypes"): the centroid term is Eq. 3
    (CPCL, ``CE(x . cm / τ)``) and the hard term Eq. 11 (HPCL, ``CE(x . hm / τ)``) with k = 1 hard sample, each over
    its own C columns. ``loss="official"`` returns the official code's ``0.5 (CE_hard + relu(CE_mean - margin))``;
    ``loss="paper"`` returns ``CE_mean + CE_hard``.

    Update (backward), per label y present in the batch, with p = features[y] before any change (Eq. 6/14):
    ``features[y] <- normalize(μ features[y] + (1 - μ) mean of the batch members of y)`` and, with the member least
    similar to p (argmin of ``x . p``, first in batch order on ties), ``features[y + C] <- normalize(μ features[y + C]
    + (1 - μ) x_hard)``.

    Options (paper-vs-code, PCLHD spec §3.1): ``centroid_update="sequential"`` updates the mean prototype once per
    sample in batch order (cluster-contrast) instead of once with the batch mean; ``hard_update="sequential"`` feeds
    every member to the hard prototype in batch order (paper Eq. 14-15) instead of only the least similar one;
    ``hard_k`` > 1 uses the mean of the k least similar members (paper Fig. 2b).

    Args:
        num_features: D. num_samples: C (clusters). temp: τ. momentum: μ in [0, 1). margin: of the official loss.
    forward(inputs (B, D) float, targets (B,) int64 in [0, C)) -> loss ().
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 loss: str = "official", margin: float = 0.2, centroid_update: str = "batch_mean",
                 hard_update: str = "hardest", hard_k: int = 1):
        super().__init__()
        if loss not in ("official", "paper"):
            raise ValueError(f"loss must be 'official' or 'paper', got {loss!r}")
        if not 0.0 <= momentum < 1.0 or not temp > 0:
            raise ValueError(f"need temp > 0 and momentum in [0, 1), got temp={temp}, momentum={momentum}")
        if centroid_update not in ("batch_mean", "sequential"):
            raise ValueError(f"centroid_update must be 'batch_mean' or 'sequential', got {centroid_update!r}")
        if hard_update not in ("hardest", "sequential"):
            raise ValueError(f"hard_update must be 'hardest' or 'sequential', got {hard_update!r}")
        if int(hard_k) < 1:
            raise ValueError(f"hard_k must be >= 1, got {hard_k!r}")
        self.num_features, self.temp, self.momentum, self.loss, self.margin = num_features, temp, momentum, loss, margin
        self.centroid_update, self.hard_update, self.hard_k = centroid_update, hard_update, int(hard_k)
        #: False: forward computes the logits but backward leaves ``features`` unchanged (read-only use).
        self.update_rows = True
        self.register_buffer("features", torch.zeros(2 * num_samples, num_features))

    def _update(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        features = self.features
        classes = features.shape[0] // 2
        labels, inverse = torch.unique(targets, return_inverse=True)
        sims = (x * features[targets]).sum(1)  # against the mean prototypes before the update
        if self.hard_update == "hardest":
            hard = lowest_k_mean_per_group(x, sims, inverse, labels.numel(), self.hard_k)
        if self.centroid_update == "batch_mean":
            counts = torch.bincount(inverse, minlength=labels.numel()).to(x.dtype)
            means = torch.zeros(labels.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
            momentum_step_(features, labels, means / counts[:, None], self.momentum)
        else:
            memory_update(x, targets, features, momentum=self.momentum, update="sequential", normalized=True)
        if self.hard_update == "hardest":
            momentum_step_(features, labels + classes, hard, self.momentum)
        else:
            memory_update(x, targets + classes, features, momentum=self.momentum, update="sequential",
                          normalized=True)

    def terms(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE over the mean prototypes, CE over the hard prototypes), each a () batch mean; one memory update in
        backward when either is differentiated."""
        if self.features.shape[0] % 2:
            raise ValueError(f"features must have 2C rows (mean then hard prototypes), got {self.features.shape[0]}")
        classes = self.features.shape[0] // 2
        targets = check_memory_inputs(inputs, targets, self.num_features, classes)
        x = F.normalize(inputs.to(self.features.dtype), dim=1)
        update = partial(self._update, targets=targets) if self.update_rows else None
        logits = MemoryLogits.apply(x, self.features, update) / self.temp
        return F.cross_entropy(logits[:, :classes], targets), F.cross_entropy(logits[:, classes:], targets)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce_mean, ce_hard = self.terms(inputs, targets)
        if self.loss == "official":
            return 0.5 * (ce_hard + F.relu(ce_mean - self.margin))
        return ce_mean + ce_hard


class DynamicMemory(nn.Module):
    """PCLHD dynamic-prototype memory: M samples per cluster, cluster c at rows ``c + C i`` (i < M) of ``features``.

    Loss (PCLHD Eq. 19–20): logits ``x . features^T / τ`` split into M chunks of C; for the target column the positive
    is the *minimum* over the chunks (the farthest same-cluster sample, Eq. 19 first case), every other column takes
    the *maximum* (the closest sample of that cluster, second case); cross-entropy over the C combined columns.

    Update (backward): for every label c in the batch, its M rows are overwritten with batch members of c chosen at
    random (without replacement when c has at least M members, else with replacement), with no momentum and no
    renormalisation. The written rows are ``update_features`` (the momentum encoder's features ``φ_m``, Eq. 17) when
    given, else the normalised ``inputs``. ``generator`` makes the choice reproducible.

    forward(inputs (B, D), targets (B,) int64, update_features (B, D) or None) -> loss ().
    """

    def __init__(self, num_features: int, num_samples: int, num_instances: int = 16, temp: float = 0.05,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_instances < 1 or not temp > 0:
            raise ValueError(f"need num_instances >= 1 and temp > 0, got {num_instances}, {temp}")
        self.num_features, self.num_instances, self.temp, self.generator = num_features, num_instances, temp, generator
        #: False: backward leaves ``features`` unchanged (PCLHD's official code never updates its dynamic bank).
        self.update_rows = True
        self.register_buffer("features", torch.zeros(num_instances * num_samples, num_features))

    def _update(self, x: torch.Tensor, targets: torch.Tensor, written: torch.Tensor) -> None:
        classes = self.features.shape[0] // self.num_instances
        slots = torch.arange(self.num_instances, device=x.device) * classes
        gen = self.generator
        for label in torch.unique(targets).tolist():
            members = torch.nonzero(targets == label).flatten()
            n = members.numel()
            if n >= self.num_instances:
                pick = members[torch.randperm(n, generator=gen, device=gen.device if gen else "cpu")
                               [: self.num_instances].to(x.device)]
            else:
                pick = members[torch.randint(0, n, (self.num_instances,), generator=gen,
                                             device=gen.device if gen else "cpu").to(x.device)]
            self.features[label + slots] = written[pick].to(self.features.dtype)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                update_features: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.features.shape[0]
        if rows % self.num_instances:
            raise ValueError(f"features must have M*C rows with M={self.num_instances}, got {rows}")
        classes = rows // self.num_instances
        targets = check_memory_inputs(inputs, targets, self.num_features, classes)
        x = F.normalize(inputs.to(self.features.dtype), dim=1)
        if update_features is None:
            written = x.detach()
        else:
            check_memory_inputs(update_features, None, self.num_features, None)
            if update_features.shape[0] != inputs.shape[0]:
                raise ValueError("update_features must have one row per input")
            written = update_features.detach()
        update = partial(self._update, targets=targets, written=written) if self.update_rows else None
        logits = MemoryLogits.apply(x, self.features, update)
        chunks = (logits / self.temp).view(-1, self.num_instances, classes)
        positive = chunks.min(dim=1).values
        negative = chunks.max(dim=1).values
        combined = torch.where(F.one_hot(targets, classes).bool(), positive, negative)
        return F.cross_entropy(combined, targets)


class MultiCentreMemory(nn.Module):
    """HIL multi-centre memory ``features`` (C, P, D): centre 0 the cluster mean, 1..P-1 K-means sub-centres.

    Returns two losses (HIL, "Hierarchical identity learning"):

    * identity loss (HIL Eq. 5–6 with multi-centre prototypes): logit of cluster c = max over its P centres,
      cross-entropy against ``targets``;
    * MCCL (Eq. 18–24): s = the cluster of the single most similar centre (Eq. 19); positives = all P centres of s
      (Eq. 21), negatives = the most similar centre of every other cluster (Eq. 20, 22);
      ``-log(S_p / (S_p + S_n))`` averaged over the batch (Eq. 23).

    Update (backward): for each sample in batch order, the centre of its target cluster most similar to it (chosen
    with the memory before this step's updates) gets ``normalize(μ c + (1 - μ) x)`` — the sequential update of
    :func:`vireid_fast.ops.memory_update` on the flattened (C P, D) rows, so repeated choices chain in batch order.

    forward(inputs (B, D), targets (B,) int64 in [0, C)) -> (identity loss (), MCCL loss ()).
    """

    def __init__(self, num_features: int, num_samples: int, num_centres: int, temp: float = 0.05,
                 momentum: float = 0.2):
        super().__init__()
        if num_centres < 1 or not temp > 0 or not 0.0 <= momentum < 1.0:
            raise ValueError("need num_centres >= 1, temp > 0 and momentum in [0, 1)")
        self.num_features, self.temp, self.momentum = num_features, temp, momentum
        self.register_buffer("features", torch.zeros(num_samples, num_centres, num_features))

    def _update(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        nearest_centre_update(x, self.features, targets, self.momentum)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features.dim() != 3 or not self.features.is_contiguous():
            raise ValueError("features must be a contiguous (C, P, D) buffer")
        classes, centres, _ = self.features.shape
        targets = check_memory_inputs(inputs, targets, self.num_features, classes)
        x = F.normalize(inputs.to(self.features.dtype), dim=1)
        flat = self.features.view(classes * centres, -1)
        logits = MemoryLogits.apply(x, flat, partial(self._update, targets=targets)) / self.temp
        logits = logits.view(-1, classes, centres)
        per_cluster = logits.max(dim=2).values
        identity = F.cross_entropy(per_cluster, targets)
        return identity, multi_centre_contrast(logits)[0].mean()


def nearest_centre_update(x: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """For each row b in batch order, the centre of cluster ``targets[b]`` most similar to x_b (chosen with the buffer
    before this call) moves to ``normalize(μ c + (1 - μ) x_b)`` — sequential :func:`memory_update` on the flattened
    (C P, D) rows. x: (B, D) unit rows; features: contiguous (C, P, D) buffer, updated in place."""
    flat = features.view(-1, features.shape[-1])
    centres = features.shape[1]
    nearest = torch.einsum("bd,bpd->bp", x, features[targets]).argmax(1)
    memory_update(x, targets * centres + nearest, flat, momentum=momentum, update="sequential", normalized=True)


def multi_centre_contrast(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MCCL (HIL Eq. 19-23) per row from logits (B, C, P) = similarity / τ: s = the cluster of the single largest
    logit; ``-log(sum_p e^{l[s, p]} / (sum_p e^{l[s, p]} + sum_{c != s} e^{max_p l[c, p]}))``. Returns (per-row loss
    (B,), s (B,) int64)."""
    per_cluster = logits.max(dim=2).values
    chosen = per_cluster.detach().argmax(1)
    batch = torch.arange(logits.shape[0], device=logits.device)
    lse_pos = torch.logsumexp(logits[batch, chosen], dim=1)
    negatives = per_cluster.masked_fill(F.one_hot(chosen, logits.shape[1]).bool(), float("-inf"))
    return torch.logaddexp(lse_pos, torch.logsumexp(negatives, dim=1)) - lse_pos, chosen
