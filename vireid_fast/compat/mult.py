"""MULT drop-ins (``memory.py``, ``cross_association.py``, ``utils/faiss_rerank.py`` of FranklinLingfeng/code_for_MULT).

    from memory import ClusterMemory                                  # -> vireid_fast.compat.mult
    from cross_association import MULT, generate_one_hot_label        # -> vireid_fast.compat.mult
    from utils.faiss_rerank import compute_jaccard_distance           # -> vireid_fast.compat.mult (also rerank_jaccard)

MULT's ``ClusterMemory`` returns the logits ``normalize(x) . features^T / temp`` (the trainer applies its own
losses) and updates only when ``targets`` are given and ``momentum_fix`` is True.
"""

from __future__ import annotations

import torch

from ._association import generate_center, generate_one_hot_label, pairwise_distance, rerank_jaccard, sinkhorn_solver
from ._cluster_memory import MemoryBank, live_buffer, logits_with_update
from ._jaccard import timed_jaccard

__all__ = ["MULT", "ClusterMemory", "compute_jaccard_distance", "generate_center", "generate_one_hot_label", "lp",
           "pairwise_distance", "rerank_jaccard", "sinkhorn_solver"]

LP_TOL, LP_MAX_ITER = 1e-2, 20
OT_LAMBDA = 25


def compute_jaccard_distance(target_features, k1: int = 20, k2: int = 6, print_flag: bool = True,
                             search_option: int = 3, use_float16: bool = False):
    """cluster-contrast's Jaccard distance with MULT's default ``search_option=3`` (ignored: our kNN is exact);
    see :func:`vireid_fast.compat.clustercontrast.compute_jaccard_distance`. Returns (N, N) numpy float32."""
    del search_option
    return timed_jaccard(target_features, k1, k2, print_flag, use_float16)


class ClusterMemory(MemoryBank):
    """MULT's memory: ``features`` (C, D) buffer; forward returns logits.

    Args:
        num_features: D. num_samples: C. temp: τ. momentum: μ. use_hard: stored (unused, as in the community code).
    forward(inputs (B, D), targets=None, momentum_fix=True) -> logits (B, C) = normalize(inputs) . features^T / τ;
    backward then moves ``features[targets[b]]`` towards x_b sample by sample (cluster-contrast's update) when
    ``targets`` is given and ``momentum_fix`` is True.
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False):
        super().__init__(num_features, num_samples, temp, momentum, use_hard)
        self.threshold = 0.5

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                momentum_fix: bool = True) -> torch.Tensor:
        update = "sequential" if momentum_fix == True else "none"  # noqa: E712 - the community tests == True
        return logits_with_update(inputs, targets, live_buffer(self), self.momentum, update) / self.temp


def lp(aff_ir, aff_rgb, aff_ir_rgb, aff_rgb_ir, y_rgb, y_ir_cm, alpha):
    """MULT's label propagation (positional roles as in the community ``lp``).

    Alternates ``y_rgb <- (1-α) aff_rgb_ir y_ir_cm + α y_rgb0``, ``y_ir_cm <- (1-α) aff_ir_rgb y_rgb + α y_ir_cm0``,
    then one half step of smoothing within each side (``0.5 aff y + 0.5 y``), until the larger relative L1 change is
    <= 0.01 or 20 rounds. Returns ``(y_ir_cm, y_rgb)``.
    """
    first, second = y_rgb.clone(), y_ir_cm.clone()
    prev_first, prev_second = first, second
    change, rounds = float("inf"), 0
    while change > LP_TOL and rounds < LP_MAX_ITER:
        first = (1 - alpha) * aff_rgb_ir.mm(second) + alpha * y_rgb
        second = (1 - alpha) * aff_ir_rgb.mm(first) + alpha * y_ir_cm
        first = 0.5 * aff_rgb.mm(first) + 0.5 * first
        second = 0.5 * aff_ir.mm(second) + 0.5 * second
        change = max(float((second - prev_second).abs().sum() / prev_second.sum()),
                     float((first - prev_first).abs().sum() / prev_first.sum()))
        prev_first, prev_second = first, second
        rounds += 1
        print(f"Total time for label propagation: eps: {change:.5f} iter: {rounds:3d}")
    return second, first


def _as_tensor(dist, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(dist).to(device=like.device, dtype=like.dtype)


def MULT(args, epoch, features_RGB, features_IR, labels_RGB, labels_IR, centers_RGB, centers_IR,  # noqa: N802, N803
         dist_rgb, dist_ir, temp=0.05):
    """MULT's cross-modality label transfer (soft labels by two label propagations over Jaccard and OT graphs).

    Args:
        args: namespace with ``alpha`` (the transfer weight). epoch, labels_RGB, labels_IR: unused, as in the
            community function. features_RGB (N_v, D), features_IR (N_r, D), centers_RGB (K_v, D), centers_IR
            (K_r, D): float tensors. dist_rgb (N_v, N_v), dist_ir (N_r, N_r): Jaccard distances (numpy or torch).
        temp: temperature of the initial soft labels.
    Returns:
        the community's 10-tuple ``(labels_RGB, labels_IR, RGB_instance_IR_label, IR_instance_RGB_label,
        centers_RGB, centers_IR, y_rgb, y_ir, y_rgb_cm, y_ir_cm)`` (labels: argmax of the propagated soft labels).
    """
    del epoch, labels_RGB, labels_IR
    k_rgb, k_ir = centers_RGB.shape[0], centers_IR.shape[0]
    y_rgb = torch.softmax(features_RGB.mm(centers_RGB.t()) / temp, dim=1)
    y_ir = torch.softmax(features_IR.mm(centers_IR.t()) / temp, dim=1)
    y_rgb_cm = generate_one_hot_label(sinkhorn_solver(pairwise_distance(features_RGB, centers_IR)).argmax(1), k_ir)
    y_ir_cm = generate_one_hot_label(sinkhorn_solver(pairwise_distance(features_IR, centers_RGB)).argmax(1), k_rgb)
    plan = sinkhorn_solver(pairwise_distance(features_RGB, features_IR), lambda_sk=OT_LAMBDA)
    aff_rgb = 1 - _as_tensor(dist_rgb, features_RGB)
    aff_ir = 1 - _as_tensor(dist_ir, features_IR)
    aff_rgb = aff_rgb / aff_rgb.sum(1, keepdim=True)
    aff_ir = aff_ir / aff_ir.sum(1, keepdim=True)
    aff_rgb_ir = plan / plan.sum(1, keepdim=True)
    aff_ir_rgb = plan.t() / plan.t().sum(1, keepdim=True)
    y_rgb_cm_new, y_ir_new = lp(aff_rgb, aff_ir, aff_rgb_ir, aff_ir_rgb, y_ir, y_rgb_cm, alpha=args.alpha)
    y_ir_cm_new, y_rgb_new = lp(aff_ir, aff_rgb, aff_ir_rgb, aff_rgb_ir, y_rgb, y_ir_cm, alpha=args.alpha)
    return (y_rgb_new.argmax(1), y_ir_new.argmax(1), y_rgb_cm_new.argmax(1), y_ir_cm_new.argmax(1), centers_RGB,
            centers_IR, y_rgb_new, y_ir_new, y_rgb_cm_new, y_ir_cm_new)
