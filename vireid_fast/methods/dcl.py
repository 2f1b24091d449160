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

from ..config import spec
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

    def __init__(self, params, trainer):
        super().__init__(params, trainer)
        self.memories: dict[str, torch.Tensor] = {}

    def build_memories(self, features, labels):
        self.memories = {m: cluster_means(features[m], labels[m]).to(self.trainer.device) for m in features}

    def _loss(self, feats, targets, memory):
        from ..ops import memory_contrastive

        return memory_contrastive(feats.float(), targets, memory, temp=self.params.temp,
                                  momentum=self.params.momentum, update=self.params.memory_update)

    def training_step(self, batch):
        trainer = self.trainer
        x_vis = trainer.augment(batch.visible_images)
        x_aug = trainer.augment_channel(batch.visible_images)
        x_ir = trainer.augment(batch.infrared_images)
        nv, ni = x_vis.shape[0], x_ir.shape[0]
        modality = torch.cat([torch.zeros(2 * nv, dtype=torch.long), torch.ones(ni, dtype=torch.long)])
        with trainer.autocast():
            feats = trainer.model(torch.cat([x_vis, x_aug, x_ir]), modality.to(x_vis.device))
        f_vis, f_aug, f_ir = feats[:nv], feats[nv:2 * nv], feats[2 * nv:]
        y_vis, y_ir = batch.visible_labels, batch.infrared_labels
        # In multi-process runs every rank computes the loss over the global batch so the memories stay identical.
        f_vis, f_aug, f_ir = trainer.gather(f_vis), trainer.gather(f_aug), trainer.gather(f_ir)
        y_vis, y_ir = trainer.gather(y_vis), trainer.gather(y_ir)
        p = self.params
        return {
            "visible": p.visible_weight * self._loss(f_vis, y_vis, self.memories["visible"]),
            "augmented": p.augmented_weight * self._loss(f_aug, y_vis, self.memories["visible"]),
            "infrared": p.infrared_weight * self._loss(f_ir, y_ir, self.memories["infrared"]),
        }

    def state(self):
        return {f"memory_{m}": t.detach().cpu() for m, t in self.memories.items()}

    def load_state(self, state):
        self.memories = {k[len("memory_"):]: v.to(self.trainer.device).contiguous() for k, v in state.items()
                         if k.startswith("memory_")}
