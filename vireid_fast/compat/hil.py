"""HIL drop-ins (``clustercontrast.models.cm`` and ``clustercontrast.utils.faiss_rerank`` of haonanshi0125/HIL).

    from clustercontrast.models.cm import ClusterMemory, Memory_wise_v3, ClusterMemory_shared   # -> compat.hil
    from clustercontrast.utils.faiss_rerank import compute_jaccard_distance, compute_ranked_list, \\
        compute_ranked_list_cm                                                                   # -> compat.hil

``ClusterMemory`` / ``ClusterMemory_shared`` take ``ca=`` (per-sample loss weights) and ``training_momentum=`` and
carry the ``features_d`` (C, 10, D) buffer the scripts assign and the trainer reads; ``Memory_wise_v3`` is the
instance memory (``features``, ``labels``, ``cam`` buffers); the ranked lists are inner-product orders without the
first column, as numpy arrays.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.knn import knn
from ..ops.memory_contrastive import memory_contrastive, memory_update
from ._cluster_memory import MemoryBank, live_buffer, logits_with_update
from .clustercontrast import compute_jaccard_distance

__all__ = ["ClusterMemory", "ClusterMemory_shared", "Memory_wise_v3", "compute_jaccard_distance",
           "compute_ranked_list", "compute_ranked_list_cm"]

CENTRES_PER_CLUSTER = 10  # the second dimension of the community's features_d buffer


class ClusterMemory(MemoryBank):
    """HIL's cluster memory: cluster-contrast's loss and update, with per-call momentum and per-sample weights.

    Args:
        num_features: D. num_samples: C. temp: τ. momentum: μ. use_hard: cm_hard update instead of sequential.
    Buffers: ``features`` (C, D) (the prototypes, updated in backward) and ``features_d`` (C, 10, D) (assigned by
    the scripts and read by the trainer; the loss does not use it, as in the community code).
    forward(inputs (B, D), targets (B,), ca=None, training_momentum=None) -> loss (): mean cross-entropy, or
    ``mean(ca * per-sample cross-entropy)`` when ``ca`` (B,) is given; ``training_momentum`` (if not None) replaces
    ``momentum`` for this call's update.
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__(num_features, num_samples, temp, momentum, use_hard)
        self.register_buffer("features_d", torch.zeros(num_samples, CENTRES_PER_CLUSTER, num_features))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, ca=None, training_momentum=None) -> torch.Tensor:
        features = live_buffer(self)
        momentum = self.momentum if training_momentum is None else float(training_momentum)
        update = "hard" if self.use_hard else "sequential"
        targets = targets.to(features.device)
        if ca is None:
            return memory_contrastive(inputs.to(features.device), targets, features, temp=self.temp,
                                      momentum=momentum, update=update)
        logits = logits_with_update(inputs, targets, features, momentum, update) / self.temp
        return (F.cross_entropy(logits, targets, reduction="none") * ca).mean()


class ClusterMemory_shared(ClusterMemory):  # noqa: N801 - the community's class name
    """The memory HIL shares between the two modalities (one instance assigned to both trainer slots); identical
    semantics to :class:`ClusterMemory`."""


class Memory_wise_v3(nn.Module):  # noqa: N801 - the community's class name
    """HIL's instance memory: one row per training image.

    Args:
        num_features: D. num_samples: N, the number of images. num_cluster: accepted as the community does (unused
            by the loss). temp: τ. momentum: μ of the per-sample update of the rows ``indexes``.
    Buffers ``features`` (N, D), ``labels`` (N,) int32 and ``cam`` (N,) int32, all assigned by the scripts.
    forward(inputs (B, D), indexes (B,), cameras, neighbor_eps=0.9) -> loss ():
    ``mean_b -log(max(softmax(x_b . features^T / τ)[indexes_b], 1e-8))``; backward then moves ``features[indexes_b]``
    towards x_b sample by sample (cluster-contrast's update on instance rows).
    """

    def __init__(self, num_features: int, num_samples: int, num_cluster: int, temp: float = 0.05,
                 momentum: float = 0.2):
        super().__init__()
        self.num_features = num_features
        self.num_samples = num_samples
        self.momentum = momentum
        self.temp = temp
        self.devices = "cuda" if torch.cuda.is_available() else "cpu"
        self.register_buffer("features", torch.zeros(num_samples, num_features))
        self.register_buffer("labels", torch.zeros(num_samples).int())
        self.register_buffer("cam", torch.zeros(num_samples).int())
        self.cam_mem = collections.defaultdict(list)

    def updateEM(self, inputs: torch.Tensor, indexes: torch.Tensor) -> None:  # noqa: N802 - community name
        """``features[y] <- normalize(μ features[y] + (1 - μ) x)`` sample by sample (inputs used as given)."""
        features = live_buffer(self)
        memory_update(inputs.detach().to(features.device), indexes.to(features.device), features,
                      momentum=self.momentum, update="sequential", normalized=True)

    def forward(self, inputs: torch.Tensor, indexes: torch.Tensor, cameras=None, neighbor_eps: float = 0.9):
        self.thresh = -1
        self.neighbor_eps = neighbor_eps
        features = live_buffer(self)
        indexes = indexes.to(features.device)
        logits = logits_with_update(inputs, indexes, features, self.momentum) / self.temp
        log_p = F.log_softmax(logits, dim=1).gather(1, indexes[:, None]).squeeze(1)
        return -log_p.clamp_min(float(np.log(1e-8))).mean()

    def compute_mask(self, size, img_ids, device=None) -> torch.Tensor:
        """(B, N) float mask with a 1 at (b, img_ids[b])."""
        mask = torch.zeros(size, device=device)
        mask[torch.arange(size[0]), img_ids] = 1
        return mask

    def cam2uid_(self) -> None:
        """``self.cam2uid`` (camera -> list of row indices) and ``self.allcam`` (sorted cameras) from ``cam``."""
        self.cam2uid = collections.defaultdict(list)
        for uid, cam in enumerate(self.cam.tolist()):
            self.cam2uid[int(cam)].append(uid)
        self.allcam = torch.unique(self.cam).cpu().numpy().tolist()
        print(self.allcam)

    def generate_cluster_features(self, labels, features, cam_id):
        """Mean of ``self.features`` per label (sorted, outliers -1 skipped) over the rows of camera ``cam_id``;
        returns (centres (K, D), K). As in the community code, the ``labels``/``features`` arguments are unused."""
        keep = (self.labels != -1) & (self.cam.to(torch.int64) == int(cam_id))
        lab = self.labels[keep].to(torch.int64)
        uniq, inverse = torch.unique(lab, return_inverse=True)
        sums = torch.zeros(uniq.numel(), self.features.shape[1], dtype=self.features.dtype,
                           device=self.features.device).index_add_(0, inverse.to(self.features.device),
                                                                    self.features[keep.to(self.features.device)])
        centres = sums / torch.bincount(inverse, minlength=uniq.numel()).to(sums)[:, None]
        print("cam cluster", cam_id, centres.size(0))
        return centres, centres.size(0)

    def cam_mem_gen(self) -> None:
        """``self.cam_mem[c]`` = :meth:`generate_cluster_features` for every camera of ``self.allcam``."""
        total = 0
        for c in self.allcam:
            self.cam_mem[c], num_c = self.generate_cluster_features(self.labels, self.features, c)
            total += num_c
        print(total)


def _ranked(query: torch.Tensor, base: torch.Tensor, k: int, verbose: bool) -> np.ndarray:
    start = time.time()
    if verbose:
        print("Computing ranked list...")
    q = query.detach().float().cpu().contiguous()
    b = base.detach().float().cpu().contiguous()
    _, rank = knn(q, k + 1, b, metric="ip")
    if verbose:
        print(f"Ranked list computing time cost: {time.time() - start}")
    return rank[:, 1:].numpy()


@torch.no_grad()
def compute_ranked_list(features, k: int = 20, search_option: int = 3, fp16: bool = False,
                        verbose: bool = True) -> np.ndarray:
    """HIL's ranked list: per row, the k rows with the largest inner product after the best one (itself for
    L2-normalised rows).

    Args:
        features: (N, d) torch tensor (the community sorts ``1 - f f^T``, i.e. by inner product).
        k: list length, k + 1 <= N. search_option, fp16: accepted and ignored (the community ignores them too).
    Returns:
        (N, k) int64 numpy array; ties go to the lower index (numpy's quicksort leaves them in any order).
    """
    del search_option, fp16
    return _ranked(features, features, k, verbose)


@torch.no_grad()
def compute_ranked_list_cm(features_g, features_p, k: int = 20, search_option: int = 3, fp16: bool = False,
                           verbose: bool = True) -> np.ndarray:
    """Cross-set ranked list: per row of ``features_g``, the rows of ``features_p`` ranked 2..k+1 by inner product
    (the first is dropped as in the community code, even though it is not the row itself).

    Returns:
        (N_g, k) int64 numpy array, ties to the lower index.
    """
    del search_option, fp16
    return _ranked(features_g, features_p, k, verbose)
