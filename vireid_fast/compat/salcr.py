"""SALCR drop-ins (``memory.py``, ``cross_association.py``, ``utils/faiss_rerank.py`` of code-for-SALCR).

    from memory import ClusterMemory, WeightedMemory                  # -> vireid_fast.compat.salcr
    from cross_association import part_ot, knn_graph, agg_feature     # -> vireid_fast.compat.salcr
    from utils.faiss_rerank import compute_jaccard_distance           # -> vireid_fast.compat.salcr

(``rerank_jaccard`` of the same file is here too.)

Both memories return logits and carry a ``features_avg`` buffer; ``ClusterMemory(..., cross=True)`` updates in an
order drawn by ``torch.randperm`` at backward time, as the community does. ``agg_feature`` is the CMFP op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cmfp import cmfp
from ._association import generate_center, generate_one_hot_label, pairwise_distance, rerank_jaccard, sinkhorn_solver
from ._cluster_memory import MemoryBank, live_buffer, logits_with_update
from ._jaccard import timed_jaccard

__all__ = ["ClusterMemory", "WeightedMemory", "agg_feature", "compute_jaccard_distance", "generate_center",
           "generate_one_hot_label", "knn_graph", "pairwise_distance", "part_ot", "rerank_jaccard", "sinkhorn_solver"]

PART_DIM = 2048  # width of each part feature in SALCR's concatenated part/global features
OT_LAMBDA = 5


def compute_jaccard_distance(target_features, k1: int = 20, k2: int = 6, print_flag: bool = True,
                             search_option: int = 3, use_float16: bool = False):
    """cluster-contrast's Jaccard distance with SALCR's default ``search_option=3`` (ignored: our kNN is exact)."""
    del search_option
    return timed_jaccard(target_features, k1, k2, print_flag, use_float16)


def _randperm(n: int) -> torch.Tensor:
    return torch.randperm(n)


class ClusterMemory(MemoryBank):
    """SALCR's memory: buffers ``features`` (C, D) and ``features_avg`` (C, D, unused by the loss as upstream).

    forward(inputs (B, D), targets=None, cross=False) -> logits (B, C) = normalize(inputs) . features^T / τ; backward
    moves ``features[targets[b]]`` towards x_b sample by sample, in batch order, or with ``cross=True`` in the order
    of ``torch.randperm(B)`` drawn at backward time (the default generator, as the community draws it).
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__(num_features, num_samples, temp, momentum, use_hard)
        self.threshold = 0.5
        self.register_buffer("features_avg", torch.zeros(num_samples, num_features))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, cross: bool = False):
        order = _randperm if cross else None
        return logits_with_update(inputs, targets, live_buffer(self), self.momentum, order=order) / self.temp


class WeightedMemory(MemoryBank):
    """SALCR's weighted memory: only each label's hardest members move its prototype.

    forward(inputs (B, D), targets (B,), weight=None) -> logits (B, C) / τ. ``weight`` is ignored (recomputed, as
    upstream): w_b = 1 if ``x_b . features[y_b] <= 1.1 max(0, min over the batch members of y_b of that similarity)``
    else 0; backward then applies ``m[y_b] <- normalize(μ m[y_b] + (1 - μ) w_b x_b)`` sample by sample.
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__(num_features, num_samples, temp, momentum, use_hard)
        self.gamma = 1.1
        self.register_buffer("features", torch.zeros(num_samples, num_features))
        self.register_buffer("features_avg", torch.zeros(num_samples, num_features))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, weight=None) -> torch.Tensor:
        del weight
        features = live_buffer(self)
        targets = targets.to(features.device)
        with torch.no_grad():
            x = F.normalize(inputs.detach().to(features.device), dim=1)
            sims = (x * features[targets]).sum(1)
            labels, inverse = torch.unique(targets, return_inverse=True)
            lowest = torch.full((labels.numel(),), float("inf"), dtype=sims.dtype, device=sims.device)
            lowest = lowest.scatter_reduce(0, inverse, sims, reduce="amin")
            w = (sims <= lowest.clamp(min=0.0)[inverse] * self.gamma).float()
        return logits_with_update(inputs, targets, features, self.momentum, weight=w) / self.temp


def knn_graph(init_graph: torch.Tensor, k: int = 30) -> torch.Tensor:
    """Row-normalised k-NN graph of a dense similarity matrix (M, N): entries >= the row's k-th largest value, negative
    ones dropped. Dense in, dense out, as the community function."""
    threshold = torch.topk(init_graph, k, dim=1).values[:, -1:]
    graph = torch.where(init_graph >= threshold, init_graph, torch.zeros_like(init_graph)).clamp(min=0)
    return graph / graph.sum(1, keepdim=True)


def agg_feature(features_RGB: torch.Tensor, features_IR: torch.Tensor, k: int = 30):  # noqa: N803
    """CMFP (SALCR's cross-modality feature propagation) by the ``vireid::cmfp`` op, with no (N, N) matrix.

    Returns:
        ``(A, features_)``: A the (N_v + N_r)-square affinity as a torch sparse CSR tensor (the community returns it
        dense; ``A.to_dense()`` gives that), features_ (N_v + N_r, D) the L2-normalised propagated features.
    """
    result = cmfp(features_RGB, features_IR, k, return_affinity=True)
    return result.affinity, torch.cat((result.prop_v, result.prop_r), 0)


def part_ot(args, epoch, features_RGB_pg, features_IR_pg, labels_RGB, labels_IR, centers_RGB_pg,  # noqa: N803
            centers_IR_pg):
    """SALCR's association: optional CMFP on the global part of the features, then OT cross-modality labels.

    Args:
        args: namespace with ``part_num``, ``CMFP`` (bool), ``k_cmff``, ``lambda_ot``.
        features_RGB_pg (N_v, (part_num + 1) 2048), features_IR_pg (N_r, ...): part features then the global one.
        labels_RGB (N_v,), labels_IR (N_r,): cluster labels (-1 = outlier). centers_RGB_pg, centers_IR_pg: only their
            row counts (the class counts) are used.
    Returns:
        the community's 13-tuple ``(labels_RGB, labels_IR, cm_labels_RGB, cm_labels_IR, y_rgb, y_ir, y_rgb_cm,
        y_ir_cm, y_rgb, y_ir, y_rgb_cm, y_ir_cm, [features_RGB_, features_IR_, centers_RGB_, centers_IR_])``.
    """
    del epoch
    offset = args.part_num * PART_DIM
    rgb = F.normalize(features_RGB_pg[:, offset:], dim=-1)
    ir = F.normalize(features_IR_pg[:, offset:], dim=-1)
    k_rgb, k_ir = centers_RGB_pg.shape[0], centers_IR_pg.shape[0]
    n_v = rgb.shape[0]
    if args.CMFP == True:  # noqa: E712 - the community tests == True
        _, fused = agg_feature(rgb, ir, k=args.k_cmff)
    else:
        fused = torch.cat((rgb, ir), 0)
    rgb_, ir_ = F.normalize(fused[:n_v], dim=1), F.normalize(fused[n_v:], dim=1)
    centres_rgb, centres_ir = generate_center(labels_RGB, rgb_), generate_center(labels_IR, ir_)
    plan_vr = sinkhorn_solver(pairwise_distance(rgb_, centres_ir), lambda_sk=args.lambda_ot)
    plan_rv = sinkhorn_solver(pairwise_distance(ir_, centres_rgb), lambda_sk=args.lambda_ot)
    y_rgb = generate_one_hot_label(rgb_.mm(centres_rgb.t()).argmax(1), k_rgb)
    y_ir = generate_one_hot_label(ir_.mm(centres_ir.t()).argmax(1), k_ir)
    y_rgb_cm = generate_one_hot_label(plan_vr.argmax(1), k_ir)
    y_ir_cm = generate_one_hot_label(plan_rv.argmax(1), k_rgb)
    return (y_rgb.argmax(1), y_ir.argmax(1), y_rgb_cm.argmax(1), y_ir_cm.argmax(1), y_rgb, y_ir, y_rgb_cm, y_ir_cm,
            y_rgb, y_ir, y_rgb_cm, y_ir_cm, [rgb_, ir_, centres_rgb, centres_ir])
