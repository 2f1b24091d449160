"""The supervised ceiling: DCL's memory losses trained on the true identities, shared across modalities, plus the
identity-classification loss of supervised re-identification.

The row every seed's table reports above the unsupervised methods. Each epoch the labels are the ground-truth
identities, numbered 0..C-1 jointly over both modalities (so visible label c and infrared label c are one person),
and the memories are the per-modality identity means. Besides DCL's three terms, the shared labels allow
cross-modality terms — each modality's features against the other modality's memory, read without updating it
(each memory stays the mean of its own modality) — and an identity classifier W (C x D, the method's own parameter,
trained and checkpointed) shared by both modalities, as supervised VI-ReID baselines (AGW's ID loss) train::

    L = w_v CE(f_v, M_v) + w_a CE(f_a, M_v) + w_i CE(f_i, M_i)
        + w_x [CE(f_v, M_i) + CE(f_a, M_i) + CE(f_i, M_v)] / 3
        + w_id [CE(W f_v, y_v) + CE(W f_a, y_v) + CE(W f_i, y_i)] / 3

with ``CE(f, M) = CE(normalize(f) M^T / temp, y)``. ``cross_weight: 0, id_weight: 0`` gives DCL on true labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..modality import INFRARED, VISIBLE
from ..ops import memory_contrastive
from ..schema import spec
from .base import register_method
from .dcl import DCL


@register_method("supervised")
class Supervised(DCL):
    shared_label_space = True

    @dataclass
    class Params(DCL.Params):
        name: str = spec("supervised", help="the registered method name")
        cross_weight: float = spec(1.0, min=0.0, help="weight of the cross-modality memory terms")
        id_weight: float = spec(1.0, min=0.0, help="weight of the identity-classification terms")

    def __init__(self, params, context):
        super().__init__(params, context)
        truth = context.ground_truth()
        self.num_ids = int(np.unique(np.concatenate([truth[VISIBLE], truth[INFRARED]])).size) if truth else 0
        self.classifier = torch.nn.Linear(context.encoder.feature_dim, max(self.num_ids, 1), bias=False)
        torch.nn.init.normal_(self.classifier.weight, std=0.001)

    def pseudo_label(self, features):
        del features
        with self.ctx.timed("cluster"):
            truth = self.ctx.ground_truth()
            ids = np.unique(np.concatenate([truth[VISIBLE], truth[INFRARED]]))
            return {m: torch.from_numpy(np.searchsorted(ids, truth[m]).astype(np.int64)) for m in truth}

    def memory_losses(self, f_vis, f_aug, f_ir, y_vis, y_ir):
        losses = super().memory_losses(f_vis, f_aug, f_ir, y_vis, y_ir)
        if self.params.cross_weight > 0:
            # Read-only: the other modality's memory is a target here, not something these features move.
            def cross(feats, targets, memory):
                return memory_contrastive(feats.float(), targets, memory, temp=self.params.temp, momentum=0.0,
                                          update="none")

            losses["cross"] = self.params.cross_weight / 3.0 * (
                cross(f_vis, y_vis, self.memory_infrared) + cross(f_aug, y_vis, self.memory_infrared)
                + cross(f_ir, y_ir, self.memory_visible))
        if self.params.id_weight > 0:
            losses["identity"] = self.params.id_weight / 3.0 * (
                F.cross_entropy(self.classifier(f_vis.float()), y_vis)
                + F.cross_entropy(self.classifier(f_aug.float()), y_vis)
                + F.cross_entropy(self.classifier(f_ir.float()), y_ir))
        return losses
