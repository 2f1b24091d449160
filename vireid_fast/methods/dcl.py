"""DCL: ADCA's dual-contrastive baseline (Yang et al., "Augmented Dual-Contrastive Aggregation Learning for
Unsupervised Visible-Infrared Person Re-Identification", ACM MM 2022).

Per modality, a cluster memory initialised with the L2-normalised cluster means (outliers excluded). Each iteration
takes a visible and an infrared P×K batch; the visible batch is seen twice: with the usual augmentation and with the
channel augmentation (``ChannelExchange``: one colour channel copied to all three, or grayscale). Losses:

    L = w_v CE_mem(f(x_v), M_v) + w_a CE_mem(f(ca(x_v)), M_v) + w_i CE_mem(f(x_i), M_i)

with ``CE_mem(f, M) = CE(normalize(f) M^T / temp, y)`` and the momentum update ``M_y <- normalize(mu M_y +
(1 - mu) f)`` during backward (:func:`vireid_fast.ops.memory_contrastive`). Visible and augmented images go through
the visible stem, infrared through the infrared stem; all in one forward (shared BN statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modality import INFRARED, MODALITIES, VISIBLE
from ..ops import memory_contrastive
from ..schema import spec
from .base import Method, cluster_means, register_method


@register_method("dcl")
class DCL(Method):
    @dataclass
    class Params:
        name: str = spec("dcl", help="the registered method name")
        temp: float = spec(0.05, min=0.0, min_exclusive=True, help="memory temperature tau")
        momentum: float = spec(0.1, min=0.0, max=0.999, help="memory momentum mu")
        memory_update: str = spec("sequential", choices=("sequential", "hard", "mean"),
                                  help="cluster-contrast update (sequential = cm, hard = cm_hard)")
        visible_weight: float = spec(1.0, min=0.0)
        infrared_weight: float = spec(1.0, min=0.0)
        augmented_weight: float = spec(1.0, min=0.0, help="weight of the channel-augmented visible stream")

    def __init__(self, params, context):
        super().__init__(params, context)
        # (C_m, D) float32 cluster memories, rebuilt every epoch (checkpointed as memory_visible / memory_infrared).
        self.register_buffer("memory_visible", None)
        self.register_buffer("memory_infrared", None)

    @property
    def memories(self) -> dict[str, torch.Tensor]:
        return {VISIBLE: self.memory_visible, INFRARED: self.memory_infrared}

    def build_memories(self, features, labels):
        for m in MODALITIES:
            setattr(self, f"memory_{m}", cluster_means(features[m]["feature"], labels[m]).to(self.ctx.device))

    def _loss(self, feats, targets, memory):
        return memory_contrastive(feats.float(), targets, memory, temp=self.params.temp,
                                  momentum=self.params.momentum, update=self.params.memory_update)

    def encode_batch(self, batch):
        """(visible, channel-augmented visible, infrared) embeddings of one batch, gathered over processes."""
        ctx = self.ctx
        x_vis = ctx.augment["train"](batch.visible_images)
        x_aug = ctx.augment["channel"](batch.visible_images)
        x_ir = ctx.augment["train"](batch.infrared_images)
        nv, ni = x_vis.shape[0], x_ir.shape[0]
        modality = torch.cat([torch.zeros(2 * nv, dtype=torch.long), torch.ones(ni, dtype=torch.long)])
        with ctx.autocast():
            feats = ctx.model(torch.cat([x_vis, x_aug, x_ir]), modality.to(x_vis.device))
        f_vis, f_aug, f_ir = feats[:nv], feats[nv:2 * nv], feats[2 * nv:]
        # In multi-process runs every rank computes the loss over the global batch so the memories stay identical.
        return ctx.gather(f_vis), ctx.gather(f_aug), ctx.gather(f_ir)

    def training_step(self, batch):
        f_vis, f_aug, f_ir = self.encode_batch(batch)
        y_vis, y_ir = self.ctx.gather(batch.visible_labels), self.ctx.gather(batch.infrared_labels)
        return self.memory_losses(f_vis, f_aug, f_ir, y_vis, y_ir)

    def memory_losses(self, f_vis, f_aug, f_ir, y_vis, y_ir) -> dict[str, torch.Tensor]:
        """The weighted terms from (B, D) embeddings and (B,) labels of the three streams."""
        p = self.params
        terms = (("visible", p.visible_weight, f_vis, y_vis, self.memory_visible),
                 ("augmented", p.augmented_weight, f_aug, y_vis, self.memory_visible),
                 ("infrared", p.infrared_weight, f_ir, y_ir, self.memory_infrared))
        # A zero weight removes the term, memory update included (the update runs in backward whatever the weight).
        return {name: weight * self._loss(feats, targets, memory)
                for name, weight, feats, targets, memory in terms if weight > 0}
