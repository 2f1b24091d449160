"""PCLHD drop-ins (``clustercontrast.models.cm`` and ``clustercontrast.utils.faiss_rerank`` of shijiangming1/PCLHD).

    from clustercontrast.models.cm import ClusterMemory                       # -> vireid_fast.compat.pclhd
    from clustercontrast.utils.faiss_rerank import compute_jaccard_distance, \\
        compute_modal_invariant_jaccard_distance                               # -> vireid_fast.compat.pclhd

``ClusterMemory(..., mode='CM' | 'CMhybrid' | 'CMhard', hard_weight, smooth, num_instances)`` with
``forward(inputs, targets, model_name='encoder' | 'encoder_ema')``; the modal-invariant Jaccard takes the training
file list (``(fname, pid, cam)`` tuples) and reads each row's modality from its file name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..memory._function import MemoryLogits, first_argmin_per_group, momentum_step_
from ..ops.memory_contrastive import memory_contrastive
from ._cluster_memory import live_buffer, logits_with_update
from ._jaccard import timed_jaccard
from .clustercontrast import compute_jaccard_distance

__all__ = ["ClusterMemory", "compute_jaccard_distance", "compute_modal_invariant_jaccard_distance"]

MODES = ("CM", "CMhybrid", "CMhard")
HYBRID_MARGIN = 0.2  # the r of the official hybrid loss


def _modality_from_files(file, n: int) -> torch.Tensor:
    """(N,) int64: 1 for names containing 'ir_modify' (checked first), 0 for 'rgb_modify'."""
    names = [entry[0] for entry in file]
    if len(names) != n:
        raise ValueError(f"file must list one (fname, pid, cam) entry per feature row: got {len(names)} entries for "
                         f"N={n} rows; pass sorted(dataset_rgb.train) + sorted(dataset_ir.train) in feature order")
    out = torch.empty(n, dtype=torch.int64)
    for i, name in enumerate(names):
        if "ir_modify" in name:
            out[i] = 1
        elif "rgb_modify" in name:
            out[i] = 0
        else:
            raise ValueError(f"file[{i}] = {name!r} contains neither 'ir_modify' nor 'rgb_modify', so its modality is "
                             "unknown (the community code then drops the row from the expansion, or averages an "
                             "empty list into NaN); use the prepared SYSU/RegDB folders whose names carry the marker")
    return out


def compute_modal_invariant_jaccard_distance(target_features, file, k1: int = 20, k2: int = 6,
                                             print_flag: bool = True, search_option: int = 0,
                                             use_float16: bool = False) -> np.ndarray:
    """PCLHD's modality-invariant k-reciprocal Jaccard distance: the query expansion averages the infrared and the
    visible members of R[i][:k2] separately, then the two means.

    Args:
        target_features: (N, d) torch tensor (any device) or numpy, visible rows then infrared rows as the scripts
            concatenate them; ranked by exact squared L2 like the community's ``IndexFlatL2``.
        file: N entries ``(fname, pid, cam)``; 'ir_modify' in fname marks infrared, 'rgb_modify' visible.
        k1, k2, print_flag, use_float16: as :func:`compute_jaccard_distance`; ``search_option`` is ignored.
    Returns:
        (N, N) numpy float32 (float16 with ``use_float16``).
    """
    del search_option
    return timed_jaccard(target_features, k1, k2, print_flag, use_float16,
                         modality_of=lambda n: _modality_from_files(file, n))


def _hybrid_step(features: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    # Rows [0, C): towards each label's batch mean; rows [C, 2C): towards its member least similar to row y as it was.
    classes = features.shape[0] // 2
    labels, inverse = torch.unique(targets, return_inverse=True)
    counts = torch.bincount(inverse, minlength=labels.numel()).to(x.dtype)
    means = torch.zeros(labels.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    means /= counts[:, None]
    sims = (x * features[labels][inverse]).sum(1)
    hard = x[first_argmin_per_group(sims, inverse, labels.numel())]
    momentum_step_(features, labels, means, momentum)
    momentum_step_(features, labels + classes, hard, momentum)


def _instance_step(features_ema: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, num_instances: int) -> None:
    # Per label in order of first appearance, rows y + C*i (i < num_instances) become randomly drawn batch members,
    # drawn with numpy's global generator exactly as the community does (with replacement below 16 members).
    classes = features_ema.shape[0] // num_instances
    groups: dict[int, list[int]] = {}
    for b, y in enumerate(targets.tolist()):
        groups.setdefault(y, []).append(b)
    for y, members in groups.items():
        ids = np.random.choice(len(members), num_instances, replace=len(members) < 16)
        rows = torch.arange(num_instances, device=features_ema.device) * classes + y
        features_ema[rows] = x[torch.as_tensor(members, device=x.device)[torch.as_tensor(ids, device=x.device)]]


class ClusterMemory(nn.Module):
    """PCLHD's cluster memory in its three modes.

    Args:
        num_features: D. num_samples: C, the number of clusters. temp: τ. momentum: μ.
        mode: ``'CM'`` — ``features`` (C, D), cluster-contrast's loss and sequential update; ``'CMhybrid'`` —
            ``features`` (2C, D), mean prototypes in rows [0, C) and hard ones in [C, 2C), loss
            ``0.5 (CE(hard logits) + relu(CE(mean logits) - 0.2))``; ``'CMhard'`` — as CMhybrid for
            ``model_name='encoder'``, plus ``features_ema`` (num_instances C, D) instance prototypes for
            ``model_name='encoder_ema'`` (loss: CE over, per class, the least similar instance prototype of the
            target class and the most similar one of every other class; update: the rows of each batch label are
            replaced by members drawn with ``np.random.choice``).
        hard_weight, num_instances: stored as the community does (num_instances used by CMhard).
        smooth: > 0 replaces the cross-entropy with PCLHD's label smoothing (ε = 0.1, spread over the top
            ``C // 50`` predicted classes when that is > 1, else uniformly).
    forward(inputs (B, D) float, targets (B,) int64, model_name) -> loss (). Any other ``mode`` raises TypeError
    as the community constructor does.
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 mode: str = "CM", hard_weight: float = 0.5, smooth: float = 0, num_instances: int = 16):
        super().__init__()
        if mode not in MODES:
            raise TypeError(f"Cluster Memory {mode} is invalid! mode must be one of {', '.join(MODES)}")
        self.num_features = num_features
        self.num_samples = num_samples
        self.momentum = momentum
        self.temp = temp
        self.cm_type = mode
        self.smooth = smooth
        if mode == "CM":
            self.register_buffer("features", torch.zeros(num_samples, num_features))
        else:
            self.register_buffer("features", torch.zeros(2 * num_samples, num_features))
        if mode == "CMhard":
            self.hard_weight = hard_weight
            self.num_instances = num_instances
            self.register_buffer("features_ema", torch.zeros(num_instances * num_samples, num_features))

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy, or PCLHD's label-smoothed one when ``smooth > 0``."""
        if not self.smooth > 0:
            return F.cross_entropy(logits, targets)
        log_probs = F.log_softmax(logits, dim=1)
        eps, k = 0.1, self.num_samples // 50
        target = torch.zeros_like(log_probs).scatter_(1, targets[:, None], 1.0)
        if k > 1:
            top = torch.argsort(-log_probs, dim=1)[:, :k]
            target = target * (1 - eps) + torch.zeros_like(log_probs).scatter_(1, top, eps / k)
        else:
            target = (1 - eps) * target + eps / self.num_samples
        return (-target * log_probs).mean(0).sum()

    def _hybrid_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = live_buffer(self)
        momentum = self.momentum
        x = F.normalize(inputs.to(features.device), dim=1)
        logits = MemoryLogits.apply(x, features, lambda xd: _hybrid_step(features, xd, targets, momentum))
        mean, hard = torch.chunk(logits / self.temp, 2, dim=1)
        return 0.5 * (self.cross_entropy(hard, targets) + torch.relu(self.cross_entropy(mean, targets)
                                                                     - HYBRID_MARGIN))

    def _instance_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = live_buffer(self, "features_ema")
        n_inst = self.num_instances
        x = F.normalize(inputs.to(features.device), dim=1)
        logits = MemoryLogits.apply(x, features, lambda xd: _instance_step(features, xd, targets, n_inst))
        per_instance = torch.stack(torch.chunk(logits / self.temp, n_inst, dim=1), dim=0)  # (I, B, C)
        neg = per_instance.max(dim=0)[0]
        pos = per_instance.min(dim=0)[0]
        mask = torch.zeros_like(neg).scatter_(1, targets[:, None], 1.0)
        return self.cross_entropy(mask * pos + (1 - mask) * neg, targets)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, model_name: str = "encoder") -> torch.Tensor:
        """inputs (B, D), targets (B,) -> loss (); ``model_name`` picks the CMhard branch ('encoder_ema': the
        instance prototypes)."""
        targets = targets.to(self.features.device)
        if self.cm_type == "CM":
            if not self.smooth > 0:
                features = live_buffer(self)
                return memory_contrastive(inputs.to(features.device), targets, features, temp=self.temp,
                                          momentum=self.momentum, update="sequential")
            return self.cross_entropy(logits_with_update(inputs, targets, live_buffer(self), self.momentum)
                                      / self.temp, targets)
        if self.cm_type == "CMhybrid" or model_name == "encoder":
            return self._hybrid_loss(inputs, targets)
        if model_name == "encoder_ema":
            return self._instance_loss(inputs, targets)
        raise ValueError(f"model_name must be 'encoder' or 'encoder_ema' for mode 'CMhard', got {model_name!r}")
