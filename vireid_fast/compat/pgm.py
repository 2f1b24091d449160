"""PGM drop-ins (``clustercontrast.models.cm`` and ``clustercontrast.utils.faiss_rerank`` of zesenwu23/USL-VI-ReID).

    from clustercontrast.models.cm import ClusterMemory                      # -> vireid_fast.compat.pgm
    from clustercontrast.utils.faiss_rerank import compute_jaccard_distance  # -> vireid_fast.compat.pgm

PGM's ``ClusterMemory.forward`` takes an optional ``momentum`` that overrides the module's for that call (the
cross-modality memories of its stage 2); the Jaccard function is cluster-contrast's.
"""

from __future__ import annotations

import torch

from . import _cluster_memory
from .clustercontrast import compute_jaccard_distance

__all__ = ["ClusterMemory", "compute_jaccard_distance"]


class ClusterMemory(_cluster_memory.ClusterMemory):
    """cluster-contrast's memory (see :class:`vireid_fast.compat.clustercontrast.ClusterMemory`) whose forward takes
    ``momentum=``."""

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, momentum: float | None = None) -> torch.Tensor:
        """inputs (B, D), targets (B,) -> loss (); ``momentum`` replaces ``self.momentum`` for this call's update
        unless it is None or 0 (the community tests ``if not momentum``)."""
        return self._loss(inputs, targets, self.momentum if not momentum else float(momentum))
