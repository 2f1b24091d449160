"""PCLHD: progressive contrastive learning with hard and dynamic prototypes (Yang et al., "Learning Commonality,
Divergence and Variety for Unsupervised Visible-Infrared Person Re-identification", NeurIPS 2024), after the exact
description in ``shared/spec/methods/pclhd.md`` (paper equations and the official code ``shijiangming1/PCLHD``).

Two stages in one run (global epoch ``e < stage1_epochs`` = stage 1):

* per modality a hybrid memory (rows [0, C) centroids, [C, 2C) hard prototypes, :class:`HybridMemory`) and the
  code's hybrid loss ``H = w_h CE_hard + w_c max(0, CE_cen - rho)`` from epoch 0 (``stage1_loss: cpcl`` = paper);
* stage 2 adds the momentum encoder phi_m (train-mode forward every iteration, its own BatchNorm statistics), a
  dynamic bank of M EMA features per cluster and the dynamic-prototype loss (gradient-free in the official code:
  logged as ``value/dpcl``; ``dpcl_query: online`` trains it), PGM matching of the per-modality centres and a
  ``cross_weight``-weighted hybrid term on the other modality's bank alternating by stage-2 epoch parity, and the
  all-modality branch: clustering both modalities together on the modality-invariant Jaccard, a bank over those
  clusters and a second optimiser step per iteration on batches drawn from the clusters holding both modalities.

Presets: ``pclhd`` (official code, last-epoch model), ``pclhd_official`` (plus the official PGM failure modes;
test-set model selection is not available in the engine), ``pclhd_paper`` (the paper's equations). Every
paper-vs-code difference of the spec's §6/§9 is a key of :class:`PCLHD.Params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.samplers import CameraAwareSampler
from ..memory import DynamicMemory, HybridMemory
from ..memory._function import lowest_k_mean_per_group
from ..modality import INFRARED, MODALITIES, VISIBLE
from ..ops import memory_contrastive
from ..schema import spec
from .base import CheckpointedGenerator, Method, cluster_means, register_method
from .clustering import count_clusters, jaccard_dbscan
from .pgm import PGMMatch, cluster_centres, pgm_match

__all__ = ["PCLHD", "PCLHDOfficial", "PCLHDPaper", "all_modality_bank", "draw_dynamic_rows"]


def draw_dynamic_rows(labels: torch.Tensor, num_clusters: int, instances: int, generator: torch.Generator
                      ) -> torch.Tensor:
    """(M C,) int64 dataset indices: row ``c + C i`` is a member of cluster c drawn uniformly with replacement (the
    official initialisation, M independent draws per cluster). labels: (N,) int64, -1 = outlier; every cluster
    0..C-1 must have a member."""
    valid = torch.nonzero(labels >= 0).flatten()
    order = valid[torch.sort(labels[valid], stable=True).indices]
    counts = torch.bincount(labels[valid], minlength=num_clusters)
    if bool((counts == 0).any()):
        raise ValueError("labels: every cluster 0..C-1 needs a member to draw dynamic prototypes from")
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(instances, num_clusters, generator=generator, dtype=torch.float64)
    offsets = torch.minimum((u * counts.double()).long(), counts - 1)
    return order[(starts + offsets).flatten()]


def all_modality_bank(visible: torch.Tensor, infrared: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """All-modality cluster centres (C_a, D) float32 and a (C_a,) bool "holds both modalities" mask.

    visible (N_v, D), infrared (N_r, D): extraction features; labels (N_v + N_r,) int64 over [visible ; infrared],
    -1 = outlier. Centre = normalize((mu_v + mu_r) / 2) when the cluster has both modalities (each modality weighs
    half whatever its member count), else normalize(mean of the modality present)."""
    nv = visible.shape[0]
    num = int(labels.max()) + 1 if bool((labels >= 0).any()) else 0
    means, counts = [], []
    for feats, lab in ((visible, labels[:nv]), (infrared, labels[nv:])):
        keep = lab >= 0
        sums = torch.zeros(num, feats.shape[1], dtype=torch.float64, device=feats.device)
        sums.index_add_(0, lab[keep].to(feats.device), feats[keep].double())
        count = torch.bincount(lab[keep], minlength=num).to(feats.device)
        means.append(sums / count.clamp(min=1)[:, None])
        counts.append(count)
    both = (counts[0] > 0) & (counts[1] > 0)
    centre = torch.where(both[:, None], 0.5 * (means[0] + means[1]), means[0] + means[1])
    return F.normalize(centre, dim=1).float(), both.cpu()


@register_method("pclhd")
class PCLHD(CheckpointedGenerator, Method):
    """Config keys: see ``Params`` (help strings) and docs/methods.md."""

    ema_copies_buffers = False

    @dataclass
    class Params:
        name: str = spec("pclhd", help="the registered method name")
        temp: float = spec(0.05, min=0.0, min_exclusive=True, help="temperature tau of every memory")
        memory_momentum: float = spec(0.1, min=0.0, max=0.999, help="memory momentum alpha (0 = overwrite)")
        centroid_margin: float = spec(0.2, min=0.0, help="hinge rho of the code's centroid term")
        hard_weight: float = spec(0.5, min=0.0, help="w_h of the code's hybrid loss")
        centroid_weight: float = spec(0.5, min=0.0, help="w_c of the code's hybrid loss")
        lambda_hard: float = spec(0.5, min=0.0, max=1.0,
                                  help="paper lambda: lambda HPCL + (1 - lambda) DPCL (stage2_loss: paper)")
        hard_k: int = spec(1, min=1, max=16, help="hard samples merged into one hard prototype (paper Fig. 2b)")
        stage1_epochs: int = spec(50, min=0, help="E_CPCL: global epochs of stage 1")
        sampler: str = spec("camera", choices=("camera", "identity"),
                            help="camera: cluster-contrast's camera-aware sampler (anchor + members of other cameras, "
                                 "train.num_identities x train.num_instances per batch), as the official code; "
                                 "identity: the engine's P x K identity-balanced batches")
        restart_optimizer: bool = spec(True, help="a fresh Adam and StepLR at stage 2, as the official two runs "
                                                  "(false: one schedule over both stages)")
        stage1_loss: str = spec("hybrid", choices=("hybrid", "cpcl"),
                                help="stage-1 loss: code hybrid H (Q2) or the paper's centroid CE")
        stage2_loss: str = spec("hybrid", choices=("hybrid", "paper"),
                                help="stage-2 loss: code H + inert DPCL (Q3) or lambda HPCL + (1-lambda) DPCL")
        hard_init: str = spec("centroid", choices=("centroid", "farthest"),
                              help="hard rows at epoch start: centroid copies (code) or the farthest member (Q4)")
        centroid_update: str = spec("batch_mean", choices=("batch_mean", "sequential"), help="Q6")
        hard_update: str = spec("hardest", choices=("hardest", "sequential"), help="Q5")
        hpcl: bool = spec(True, help="ablation: hard prototypes (off: centroid bank with PGM's updates)")
        dpcl: bool = spec(True, help="ablation: EMA encoder, dynamic bank and DPCL, evaluation with phi_m")
        progressive: bool = spec(True, help="ablation: EMA/DPCL (and paper HPCL) only from stage 2")
        dpcl_query: str = spec("ema", choices=("ema", "online"),
                               help="DPCL queries: EMA encoder under no-grad (code: logged only) or phi_o (trains)")
        dpcl_memory_update: str = spec("none", choices=("none", "overwrite"),
                                       help="dynamic bank during the epoch: unchanged (code) or overwritten (Q1)")
        dpcl_instances: int = spec(16, min=1, max=64, help="M dynamic instances per cluster")
        dpcl_weight: float = spec(1.0, min=0.0, help="weight of DPCL with stage2_loss: hybrid (code: 1, inert)")
        cross_weight: float = spec(0.25, min=0.0, help="w_x of the cross-modality term (0 = off)")
        cross_form: str = spec("hybrid", choices=("hybrid", "centroid", "hard"),
                               help="cross term on the other bank: code H, or CE on its centroid / hard rows")
        all_modality_branch: bool = spec(True, help="code-only all-modality clustering and second step (Q8)")
        all_k1: int = spec(40, min=1, help="k1 of the modality-invariant Jaccard")
        all_k2: int = spec(32, min=1, help="k2 of the modality-invariant Jaccard")
        pgm_compat: str = spec("safe", choices=("safe", "strict"),
                               help="PGM on unequal cluster counts: safe fallbacks or the official crash/skip (Q11)")
        pgm_variant: str = spec("sysu", choices=("sysu", "regdb"), help="which official script strict PGM follows")

    def __init__(self, params, context):
        super().__init__(params, context)
        p = params
        if p.all_k2 > p.all_k1:
            raise ValueError(f"method.all_k2 must be <= method.all_k1, got {p.all_k2} > {p.all_k1}")
        self.uses_ema = bool(p.dpcl)
        dim = context.encoder.feature_dim
        hybrid = dict(temp=p.temp, momentum=p.memory_momentum, margin=p.centroid_margin,
                      centroid_update=p.centroid_update, hard_update=p.hard_update, hard_k=p.hard_k)
        self.hybrid_visible = HybridMemory(dim, 0, **hybrid)
        self.hybrid_infrared = HybridMemory(dim, 0, **hybrid)
        self.hybrid_all = HybridMemory(dim, 0, **hybrid)
        self.generator = torch.Generator().manual_seed(int(context.seed) * 1_000_003 + 17)
        self.dynamic_visible = DynamicMemory(dim, 0, p.dpcl_instances, temp=p.temp, generator=self.generator)
        self.dynamic_infrared = DynamicMemory(dim, 0, p.dpcl_instances, temp=p.temp, generator=self.generator)
        for memory in (self.dynamic_visible, self.dynamic_infrared):
            memory.update_rows = p.dpcl_memory_update == "overwrite"
        # hpcl off: one centroid row per cluster (PGM's memory)
        self.register_buffer("centroid_visible", torch.zeros(0, dim))
        self.register_buffer("centroid_infrared", torch.zeros(0, dim))
        self.epoch, self.stage = 0, 1
        self.match: PGMMatch | None = None
        self.all_labels: torch.Tensor | None = None
        self._all_iters = None
        self._all_lists = None
        self._epoch_info: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- schedule
    @property
    def dpcl_active(self) -> bool:
        return bool(self.params.dpcl) and (self.stage == 2 or not self.params.progressive)

    @property
    def ema_start(self) -> int:
        """Global epoch at which phi_m is (re)started from phi_o."""
        return self.params.stage1_epochs if self.params.progressive else 0

    @property
    def ema_active(self) -> bool:
        """phi_m runs its train-mode forward each iteration and is the evaluated model."""
        return self.dpcl_active

    @property
    def stage2_losses(self) -> bool:
        """Hard/dynamic (stage-2) loss forms in use: stage 2, or from epoch 0 without the progressive schedule."""
        return self.stage == 2 or not self.params.progressive

    @property
    def stage2_epoch(self) -> int:
        return self.epoch - self.params.stage1_epochs

    def start_epoch(self, epoch):
        p = self.params
        self.epoch = epoch
        self.stage = 1 if epoch < p.stage1_epochs else 2
        self._epoch_info = {"stage": float(self.stage)}
        if p.progressive and p.restart_optimizer and epoch == p.stage1_epochs > 0:
            self.ctx.restart_optimizer()
        if self.uses_ema and epoch == self.ema_start and self.ctx.ema is not None:
            # stage 2 starts phi_m from the stage-1 model (parameters and BatchNorm statistics)
            self.ctx.ema.module.load_state_dict(self.ctx.encoder.state_dict())

    def eval_encoder(self):
        return self.ctx.ema.module if self.ema_active and self.ctx.ema is not None else self.ctx.encoder

    def embed(self, model, images, modality):
        out = model(images, modality)
        # "mean": half of each view's normalised feature, so the engine's flip sum is f-bar of the spec (clustered and
        # averaged into the banks without re-normalisation, Q17); "feature" (normalised after the sum) is evaluated.
        return {"feature": out, "mean": F.normalize(out.float(), dim=1) * 0.5}

    # ----------------------------------------------------------------------------------------------- per epoch
    def pseudo_label(self, features):
        c, p = self.ctx.config.cluster, self.params
        with self.ctx.timed("cluster"):
            labels = {m: jaccard_dbscan(features[m]["mean"], k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples)
                      for m in MODALITIES}
        self.all_labels = None
        if self.stage == 2 and p.all_modality_branch:
            with self.ctx.timed("cluster_all"):
                joint = torch.cat([features[VISIBLE]["mean"], features[INFRARED]["mean"]])
                nv = features[VISIBLE]["mean"].shape[0]
                modality = torch.cat([torch.zeros(nv, dtype=torch.int64),
                                      torch.ones(joint.shape[0] - nv, dtype=torch.int64)])
                self.all_labels = jaccard_dbscan(joint, k1=p.all_k1, k2=min(p.all_k2, p.all_k1), eps=c.eps,
                                                 min_samples=c.min_samples, modality=modality)
        with self.ctx.timed("associate"):
            return self.associate(features, labels)

    def associate(self, features, labels):
        self.match = None
        if self.stage == 2 and self.params.cross_weight > 0:
            centres = {m: cluster_centres(features[m]["mean"], labels[m], count_clusters(labels[m]))[0]
                       for m in MODALITIES}
            self.match = pgm_match(centres[VISIBLE], centres[INFRARED], compat=self.params.pgm_compat,
                                   variant=self.params.pgm_variant)
            self._epoch_info.update({"pgm/swapped": float(self.match.swapped),
                                     "pgm/fallback": float(self.match.fallback)})
        return labels

    def shared_label_spaces(self, labels):
        # Each infrared cluster takes the visible cluster PGM matched it to (-1 when unmatched): the engine then
        # reports how many same-identity visible-infrared pairs the matching links (stage 2 with the cross term).
        if self.match is None:
            return {}
        return {"": (labels[VISIBLE], self.match.map_labels(labels[INFRARED], "infrared"))}

    def build_memories(self, features, labels):
        self.build_intra_memories(features, labels)
        self.build_extra_memories(features, labels)

    def build_intra_memories(self, features, labels):
        """The per-modality banks: hybrid (hpcl) or centroid rows."""
        p, device = self.params, self.ctx.device
        for m in MODALITIES:
            feats, lab = features[m]["mean"], labels[m]
            centres = cluster_means(feats, lab)
            if p.hpcl:
                hard = centres
                if p.hard_init == "farthest" and centres.shape[0]:
                    keep = lab >= 0
                    member = F.normalize(feats[keep].float(), dim=1)
                    sims = (member * centres[lab[keep]]).sum(1)
                    hard = F.normalize(lowest_k_mean_per_group(member, sims, lab[keep], centres.shape[0], p.hard_k),
                                       dim=1)
                getattr(self, f"hybrid_{m}").features = torch.cat([centres, hard]).to(device)
            else:
                setattr(self, f"centroid_{m}", centres.to(device))

    def build_extra_memories(self, features, labels):
        """Dynamic banks (DPCL active) and the all-modality bank with its lists (stage 2, branch on)."""
        p, device = self.params, self.ctx.device
        if self.dpcl_active:
            with self.ctx.timed("extract_ema"):
                ema_features = self.ctx.extract(encoder=self.ctx.ema.module)
            for m in MODALITIES:
                num = count_clusters(labels[m])
                rows = draw_dynamic_rows(labels[m], num, p.dpcl_instances, self.generator)
                bank = F.normalize(ema_features[m]["mean"][rows].float(), dim=1)
                getattr(self, f"dynamic_{m}").features = bank.to(device)
        self._all_lists = None
        if self.all_labels is not None:
            nv = features[VISIBLE]["mean"].shape[0]
            centre, both = all_modality_bank(features[VISIBLE]["mean"], features[INFRARED]["mean"], self.all_labels)
            self.hybrid_all.features = torch.cat([centre, centre]).to(device)
            # outliers and single-modality clusters are excluded explicitly (Q21)
            usable = (self.all_labels >= 0) & both[self.all_labels.clamp(min=0)]
            masked = torch.where(usable, self.all_labels, -1)
            self._all_lists = {VISIBLE: masked[:nv], INFRARED: masked[nv:]}
            self._epoch_info.update({"all/clusters": float(count_clusters(self.all_labels)),
                                     "all/both_modality_clusters": float(both.sum()),
                                     "all/images": float(usable.sum())})

    def modality_sampler(self, labels, modality, epoch, salt=0):
        if self.params.sampler == "identity":
            return super().modality_sampler(labels, modality, epoch, salt)
        t = self.ctx.config.train
        sampler = CameraAwareSampler(labels.numpy(), self.ctx.cameras(modality), t.num_identities * t.num_instances,
                                     t.num_instances, seed=self.sampler_seed(modality, salt), num_batches=t.iters)
        sampler.set_epoch(epoch)
        return sampler

    def batch_sampler(self, labels, epoch):
        samplers = super().batch_sampler(labels, epoch)
        self._all_iters = None
        if samplers is None or self._all_lists is None:
            return samplers
        if count_clusters(self._all_lists[VISIBLE]) == 0:
            self.ctx.log(f"epoch {epoch + 1}: no all-modality cluster holds both modalities; the all-modality step "
                         "is skipped this epoch")
            return samplers
        self._all_iters = {m: iter(self.modality_sampler(self._all_lists[m], m, epoch, 104_729)) for m in MODALITIES}
        return samplers

    def end_epoch(self, epoch):
        del epoch
        return dict(self._epoch_info)

    # ----------------------------------------------------------------------------------------------- per iteration
    def _encode(self, model, visible_images, infrared_images):
        """(visible rows = view 1 then the channel view, infrared rows) normalised-later embeddings and the inputs."""
        ctx = self.ctx
        x_vis = ctx.augment["train"](visible_images)
        x_aug = ctx.augment["channel"](visible_images)
        x_ir = ctx.augment["train"](infrared_images)
        nv, ni = x_vis.shape[0], x_ir.shape[0]
        images = torch.cat([x_vis, x_aug, x_ir])
        modality = torch.cat([torch.zeros(2 * nv, dtype=torch.long), torch.ones(ni, dtype=torch.long)])
        modality = modality.to(images.device)
        with ctx.autocast():
            feats = model(images, modality)
        return ctx.gather(feats[: 2 * nv].float()), ctx.gather(feats[2 * nv:].float()), (images, modality, nv)

    def _hybrid(self, memory: HybridMemory, feats, targets, form: str = "hybrid") -> torch.Tensor:
        p = self.params
        cen, hard = memory.terms(feats, targets)
        if form == "centroid":
            return cen
        if form == "hard":
            return hard
        return p.hard_weight * hard + p.centroid_weight * torch.relu(cen - p.centroid_margin)

    def intra_loss(self, feats, targets, modality) -> torch.Tensor:
        """The per-modality term of the current stage on (B, D) embeddings with (B,) labels."""
        p = self.params
        if not p.hpcl:
            update = "hard" if self.stage == 2 else "sequential"
            loss = memory_contrastive(feats, targets, getattr(self, f"centroid_{modality}"), temp=p.temp,
                                      momentum=p.memory_momentum, update=update)
            return p.lambda_hard * loss if (self.stage2_losses and p.stage2_loss == "paper") else loss
        memory = getattr(self, f"hybrid_{modality}")
        if self.stage2_losses and p.stage2_loss == "paper":
            return p.lambda_hard * self._hybrid(memory, feats, targets, "hard")
        if not self.stage2_losses and p.stage1_loss == "cpcl":
            return self._hybrid(memory, feats, targets, "centroid")
        return self._hybrid(memory, feats, targets)

    def matched_queries(self, f_vis, y_vis, f_ir, y_ir):
        """The stage-2 epoch's PGM cross queries: (features, labels mapped into the other modality's clusters, that
        modality) — even epochs visible queries on the infrared bank, odd the reverse — keeping only queries with a
        matched cluster; None when there is no match or no matched query."""
        if self.match is None:
            return None
        if self.stage2_epoch % 2 == 0:
            feats, targets, target = f_vis, self.match.map_labels(y_vis, "visible"), INFRARED
        else:
            feats, targets, target = f_ir, self.match.map_labels(y_ir, "infrared"), VISIBLE
        keep = targets >= 0
        if not bool(keep.any()):
            return None
        return feats[keep], targets[keep], target

    def cross_loss(self, f_vis, y_vis, f_ir, y_ir) -> torch.Tensor | None:
        """PGM cross term of the stage-2 epoch (:meth:`matched_queries`); None when no query has a matched
        cluster."""
        p = self.params
        queries = self.matched_queries(f_vis, y_vis, f_ir, y_ir)
        if queries is None:
            return None
        feats, targets, target = queries
        if not p.hpcl:
            return memory_contrastive(feats, targets, getattr(self, f"centroid_{target}"), temp=p.temp,
                                      momentum=p.memory_momentum, update="hard")
        return self._hybrid(getattr(self, f"hybrid_{target}"), feats, targets, p.cross_form)

    def ema_forward(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_m on the step's images in train mode under no-grad: (visible rows, infrared rows). It runs every
        iteration while phi_m is active, DPCL inert or not: its BatchNorm statistics come only from it (Q7)."""
        ctx = self.ctx
        images, modality, nv = inputs
        module = ctx.ema.module
        was_training = module.training
        module.train()
        with torch.no_grad(), ctx.autocast():
            q = module(images, modality).float()
        module.train(was_training)
        return ctx.gather(q[: 2 * nv]), ctx.gather(q[2 * nv:])

    def dpcl_loss(self, f_vis, y_vis, f_ir, y_ir, q_vis, q_ir) -> torch.Tensor:
        """DPCL over both modalities (infrared call first); queries are phi_m's features (no gradient, default) or
        the online ones, the dynamic rows written (option) are phi_m's."""
        p = self.params
        if p.dpcl_query == "ema":
            with torch.no_grad():
                return (self.dynamic_infrared(q_ir, y_ir, F.normalize(q_ir, dim=1))
                        + self.dynamic_visible(q_vis, y_vis, F.normalize(q_vis, dim=1)))
        return (self.dynamic_infrared(f_ir, y_ir, F.normalize(q_ir, dim=1))
                + self.dynamic_visible(f_vis, y_vis, F.normalize(q_vis, dim=1)))

    def step_a_losses(self, batch) -> dict[str, torch.Tensor]:
        """Per-modality, cross and dynamic terms in the official forward order (IR, RGB, cross, EMA branch), so the
        memory updates of the backward run cross -> RGB -> IR."""
        ctx, p = self.ctx, self.params
        f_vis, f_ir, inputs = self._encode(ctx.model, batch.visible_images, batch.infrared_images)
        y_vis = ctx.gather(batch.visible_labels)
        y_vis = torch.cat([y_vis, y_vis])
        y_ir = ctx.gather(batch.infrared_labels)
        losses = {"infrared": self.intra_loss(f_ir, y_ir, INFRARED), "visible": self.intra_loss(f_vis, y_vis, VISIBLE)}
        if self.stage == 2 and p.cross_weight > 0:
            cross = self.cross_loss(f_vis, y_vis, f_ir, y_ir)
            if cross is not None:
                losses["cross"] = p.cross_weight * cross
        q = self.ema_forward(inputs) if self.ema_active else None
        if self.dpcl_active:
            dyn = self.dpcl_loss(f_vis, y_vis, f_ir, y_ir, *q)
            ctx.log_value("dpcl", float(dyn.detach()))
            weight = 1.0 - p.lambda_hard if p.stage2_loss == "paper" else p.dpcl_weight
            if dyn.requires_grad and weight > 0:
                losses["dpcl"] = weight * dyn
        return losses

    def step_b_losses(self) -> dict[str, torch.Tensor]:
        """The all-modality term on batches drawn from the clusters holding both modalities (IR call first)."""
        ctx = self.ctx
        idx = {m: torch.as_tensor(next(self._all_iters[m]), dtype=torch.int64) for m in MODALITIES}
        f_vis, f_ir, _ = self._encode(ctx.model, ctx.images(VISIBLE, idx[VISIBLE].tolist()),
                                      ctx.images(INFRARED, idx[INFRARED].tolist()))
        y_vis = ctx.gather(self._all_lists[VISIBLE][idx[VISIBLE]].to(f_vis.device))
        y_ir = ctx.gather(self._all_lists[INFRARED][idx[INFRARED]].to(f_ir.device))
        return {"all_infrared": self._hybrid(self.hybrid_all, f_ir, y_ir),
                "all_visible": self._hybrid(self.hybrid_all, f_vis, torch.cat([y_vis, y_vis]))}

    def training_step(self, batch):
        losses = self.step_a_losses(batch)
        if self.stage != 2 or self._all_iters is None:
            return losses
        total = sum(losses.values())
        if not math.isfinite(float(total.detach())):
            terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
            raise FloatingPointError(f"epoch {self.epoch + 1}: the step-A loss is not finite ({terms}); lower "
                                     "train.lr or resume from the last checkpoint")
        for name, value in losses.items():
            self.ctx.log_value(f"step_a/{name}", float(value.detach()))
        self.ctx.backward_step(total)
        return self.step_b_losses()


@register_method("pclhd_official")
class PCLHDOfficial(PCLHD):
    """The official code including its PGM failure modes (test-set model selection is not reproduced)."""

    @dataclass
    class Params(PCLHD.Params):
        name: str = spec("pclhd_official", help="the registered method name")
        pgm_compat: str = spec("strict", choices=("safe", "strict"),
                               help="PGM on unequal cluster counts: safe fallbacks or the official crash/skip (Q11)")


@register_method("pclhd_paper")
class PCLHDPaper(PCLHD):
    """The paper's equations: CPCL in stage 1, lambda HPCL + (1 - lambda) DPCL (trained through phi_o) in stage 2,
    per-sample memory updates, farthest-member hard prototypes, no all-modality branch."""

    @dataclass
    class Params(PCLHD.Params):
        name: str = spec("pclhd_paper", help="the registered method name")
        stage1_loss: str = spec("cpcl", choices=("hybrid", "cpcl"), help="see pclhd")
        stage2_loss: str = spec("paper", choices=("hybrid", "paper"), help="see pclhd")
        hard_init: str = spec("farthest", choices=("centroid", "farthest"), help="see pclhd")
        centroid_update: str = spec("sequential", choices=("batch_mean", "sequential"), help="see pclhd")
        hard_update: str = spec("sequential", choices=("hardest", "sequential"), help="see pclhd")
        dpcl_query: str = spec("online", choices=("ema", "online"), help="see pclhd")
        dpcl_memory_update: str = spec("overwrite", choices=("none", "overwrite"), help="see pclhd")
        cross_form: str = spec("centroid", choices=("hybrid", "centroid", "hard"), help="see pclhd")
        all_modality_branch: bool = spec(False, help="see pclhd")

