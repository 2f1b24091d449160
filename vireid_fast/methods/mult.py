"""MULT: modality-unified label transfer with online cross-memory label refinement (Lingfeng He et al., "Exploring
Homogeneous and Heterogeneous Consistent Label Associations for Unsupervised Visible-Infrared Person ReID", IJCV
2024), after the exact description in ``shared/spec/methods/mult.md`` (paper Eq. 1-20 and the official code
``FranklinLingfeng/code_for_MULT``).

Stage 1 (global epoch ``e < stage_one_epochs``): the DCL warm-up — per-modality cluster memories, three memory
cross-entropies (visible, channel-augmented visible, infrared) on the DBSCAN labels, outliers dropped.

Stage 2: every epoch the per-modality Jaccard + DBSCAN gives raw centroids; MULT's label transfer
(:mod:`vireid_fast.methods.mult_transfer`) gives every instance, outliers included, an intra label and a cross label
in both label spaces plus soft labels (Eq. 13). Six memories are rebuilt from the normalised DBSCAN centroids. Even
epochs train in the visible label space (V-mode, 13 terms), odd epochs in the infrared one (R-mode, 14 terms): soft
memory cross-entropies on the intra (M̃), intra-cross (M̂) and shared (M^a) memories, and the OCLR terms matching the
M^a prediction of one stream to the τ/5-sharpened prediction of the other visible stream (or the same infrared
feature) on M̃ / M̂. One memory call gives one logits tensor (one autograd node) that may feed up to three terms; its
backward takes the gradient with the memory as it is then, then applies the sequential momentum update with the
call's hard labels — in reverse call order, as the official code.

Presets: ``mult`` (official code), ``mult_paper`` (the paper's equations). Every paper-vs-code difference of the
spec's §7/§9 that the engine can express is a key of :class:`MULT.Params`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..memory._function import MemoryLogits
from ..modality import INFRARED, MODALITIES, VISIBLE
from ..ops import dbscan, kreciprocal_jaccard, memory_contrastive, memory_update
from ..schema import spec
from .base import CheckpointedGenerator, Method, cluster_means, register_method
from .mult_transfer import homogeneous_affinity, kreciprocal_set_affinity, mult_association, soft_labels

__all__ = ["MULT", "MULTPaper", "mode_plan", "mult_batches", "oclr_term", "soft_cross_entropy"]

# Memory name -> label space ("V": the visible clusters, "R": the infrared clusters).
MEMORY_SPACE = {"memory_v": "V", "memory_r": "R", "memory_va": "V", "memory_ra": "R", "memory_rcm": "V",
                "memory_vcm": "R"}

# Per mode: the updating memory calls in the official forward order, and the terms
# (id, group, memory, prediction stream[, OCLR target memory]).
_PLANS = {
    "V": {
        "calls": (("memory_v", "vis"), ("memory_v", "aug"), ("memory_rcm", "ir"), ("memory_r", "ir"),
                  ("memory_va", "vis"), ("memory_va", "aug"), ("memory_va", "ir")),
        "terms": (("IM1", "im", "memory_v", "vis"), ("IM2", "im", "memory_v", "aug"), ("IM3", "im", "memory_r", "ir"),
                  ("IM4", "im", "memory_rcm", "ir"), ("CM1", "cm", "memory_va", "vis"),
                  ("CM2", "cm", "memory_va", "aug"), ("CM3", "cm", "memory_va", "ir"),
                  ("O1", "oclr", "memory_va", "vis", "memory_v"), ("O2", "oclr", "memory_va", "aug", "memory_v"),
                  ("O3", "oclr", "memory_va", "ir", "memory_rcm"), ("O4", "oclr", "memory_va", "vis", "memory_rcm"),
                  ("O5", "oclr", "memory_va", "aug", "memory_rcm"), ("O6", "oclr", "memory_va", "ir", "memory_v")),
    },
    "R": {
        "calls": (("memory_vcm", "vis"), ("memory_vcm", "aug"), ("memory_r", "ir"), ("memory_v", "vis"),
                  ("memory_v", "aug"), ("memory_ra", "vis"), ("memory_ra", "aug"), ("memory_ra", "ir")),
        "terms": (("IM1", "im", "memory_v", "vis"), ("IM2", "im", "memory_v", "aug"),
                  ("IM3", "im", "memory_vcm", "vis"), ("IM4", "im", "memory_vcm", "aug"),
                  ("IM5", "im", "memory_r", "ir"), ("CM1", "cm", "memory_ra", "vis"),
                  ("CM2", "cm", "memory_ra", "aug"), ("CM3", "cm", "memory_ra", "ir"),
                  ("O1", "oclr", "memory_ra", "vis", "memory_vcm"), ("O2", "oclr", "memory_ra", "aug", "memory_vcm"),
                  ("O3", "oclr", "memory_ra", "ir", "memory_r"), ("O4", "oclr", "memory_ra", "vis", "memory_r"),
                  ("O5", "oclr", "memory_ra", "aug", "memory_r"), ("O6", "oclr", "memory_ra", "ir", "memory_vcm")),
    },
}


def mode_plan(mode: str, *, use_im: bool = True, use_cm: bool = True, use_oclr: bool = True,
              visible_streams: int = 2, cross_stream: bool = True) -> tuple[list, list]:
    """The enabled terms of a stage-2 mode and the updating calls they need.

    Returns ``(calls, terms)``: calls = [(memory, stream)] in forward order (only those whose logits feed an
    enabled term); terms = [(id, kind, (memory, stream), target)] with kind "ce" (target None) or "oclr" (target
    (memory, stream, updating: bool); updating = the target logits are those of an updating call, else a fixed
    product with the forward-time buffer).
    """
    plan = _PLANS[mode]
    enabled = {"im": use_im, "cm": use_cm, "oclr": use_oclr}
    streams = ("vis", "aug", "ir") if visible_streams == 2 else ("vis", "ir")
    all_calls = [c for c in plan["calls"] if c[1] in streams]
    terms, needed = [], set()
    for term in plan["terms"]:
        tid, group, memory, stream = term[:4]
        if not enabled[group] or stream not in streams:
            continue
        needed.add((memory, stream))
        if group == "oclr":
            partner = stream
            if cross_stream and visible_streams == 2 and stream != "ir":
                partner = "aug" if stream == "vis" else "vis"
            target = (term[4], partner)
            updating = target in all_calls
            if updating:
                needed.add(target)
            terms.append((tid, "oclr", (memory, stream), (*target, updating)))
        else:
            terms.append((tid, "ce", (memory, stream), None))
    return [c for c in all_calls if c in needed], terms


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE(z, y) = -(1/B) Σ_i Σ_c y_ic log softmax(z_i)_c; logits (B, K), target (B, K) distributions -> ()."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


def oclr_term(pred: torch.Tensor, target: torch.Tensor, sharpen: float = 0.2, detach: bool = False) -> torch.Tensor:
    """Eq. 19: SCE(z_p, z_t) = -(1/B) Σ_i Σ_c softmax(z_t,i / s)_c log softmax(z_p,i)_c (z already divided by τ, so
    the target is P(f | M_t, τ s)); the target keeps its gradient unless ``detach``. (B, K), (B, K) -> ()."""
    if detach:
        target = target.detach()
    return soft_cross_entropy(pred, torch.softmax(target / sharpen, dim=1))


def mult_batches(vis_labels: dict, ir_labels: dict, num_labels: int, num_pos: int, iters: int,
                 generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]] | None:
    """Stage-2 batches: per iteration ``num_labels // 2`` labels of the V-space, then as many of the R-space, each
    ``num_pos`` visible and ``num_pos`` infrared indices of that label (visible row i pairs with infrared row i).

    vis_labels / ir_labels: {"V": (N,) int64, "R": (N,) int64} hard labels of each modality in each space
    (visible: ℓ_v, ℓ̂_v; infrared: ℓ̂_r, ℓ_r). Labels are drawn without replacement from those held by both
    modalities (fewer if fewer exist); a group with more than ``num_pos`` members is drawn without replacement,
    otherwise with replacement (the official rule). Returns (visible batches, infrared batches), or None when no
    label is held by both modalities in either space.
    """
    half = num_labels // 2
    spaces = []
    for space in ("V", "R"):
        groups = []
        for labels in (vis_labels[space], ir_labels[space]):
            order = torch.sort(labels, stable=True).indices
            uniq, counts = torch.unique_consecutive(labels[order], return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            groups.append((order, {int(u): (int(s), int(c)) for u, s, c in zip(uniq, starts, counts, strict=True)}))
        common = sorted(set(groups[0][1]) & set(groups[1][1]))
        spaces.append((torch.tensor(common, dtype=torch.int64), groups))
    if all(len(common) == 0 for common, _ in spaces):
        return None

    def draw(order, bounds, label):
        start, count = bounds[label]
        if count > num_pos:
            pick = torch.randperm(count, generator=generator)[:num_pos]
        else:
            pick = torch.randint(count, (num_pos,), generator=generator)
        return order[start + pick].tolist()

    vis_batches, ir_batches = [], []
    for _ in range(iters):
        vis, ir = [], []
        for common, ((vorder, vbounds), (iorder, ibounds)) in spaces:
            chosen = common[torch.randperm(len(common), generator=generator)[:half]].tolist()
            for label in chosen:
                vis += draw(vorder, vbounds, label)
                ir += draw(iorder, ibounds, label)
        vis_batches.append(vis)
        ir_batches.append(ir)
    return vis_batches, ir_batches


@register_method("mult")
class MULT(CheckpointedGenerator, Method):
    """Config keys: see ``Params`` (help strings) and docs/methods.md."""

    @dataclass
    class Params:
        name: str = spec("mult", help="the registered method name")
        temp: float = spec(0.05, min=0.0, min_exclusive=True, help="temperature tau of every memory")
        init_temp: float = spec(0.05, min=0.0, min_exclusive=True, help="tau_0 of the initial intra labels (Eq. 1)")
        oclr_sharpen: float = spec(0.2, min=0.0, max=1.0, min_exclusive=True,
                                   help="OCLR target temperature factor s (target at tau * s)")
        momentum: float = spec(0.1, min=0.0, max=0.999, help="mu of the intra and intra-cross memories")
        momentum_cross: float = spec(0.1, min=0.0, max=0.999, help="mu of the shared memories M^a")
        stage_one_epochs: int = spec(40, min=0, help="global epochs of the DCL warm-up (stage 1)")
        alpha: float = spec(0.2, min=0.0, max=1.0, min_exclusive=True, help="transfer weight alpha (Eq. 10-12)")
        beta: float = spec(0.7, min=0.0, max=1.0, help="soft-label weight beta of the one-hot part (Eq. 13)")
        ot_lambda: float = spec(25.0, min=0.0, min_exclusive=True, help="lambda of all three OT problems")
        sinkhorn_stop: str = spec("community", choices=("community", "tol"),
                                  help="OT stop: official every-10-steps column-ratio test, or the row-marginal "
                                       "L1 error of vireid::sinkhorn (Q6)")
        ot_max_iter: int = spec(500, min=1, help="Sinkhorn step cap")
        ot_tol: float = spec(0.1, min=0.0, help="Sinkhorn tolerance (community: summed column-ratio change)")
        ot_block_mb: int = spec(64, min=1, help="MB of one float64 row block of the streamed instance OT")
        ot_cache_mb: int = spec(256, min=0,
                                help="keep the N_v x N_r float32 cost while it fits in this many MB, else "
                                     "recompute it per block and pass (0 = always stream)")
        lp_max_iter: int = spec(20, min=1, help="label-transfer iteration cap")
        lp_tol: float = spec(0.01, min=0.0, help="label-transfer stop on the mean row change")
        lp_order: str = spec("gauss_seidel", choices=("gauss_seidel", "jacobi"),
                             help="second transfer update uses the fresh first one (code) or the previous (Q5)")
        homog_affinity: str = spec("soft_jaccard", choices=("soft_jaccard", "hard_kreciprocal"),
                                   help="1 - the clustering's Jaccard distance (code) or Eq. 5's set Jaccard (Q2)")
        init_label_centroids: str = spec("raw", choices=("raw", "normalized"),
                                         help="initial intra labels from raw (code) or normalised centroids (Q3)")
        cross_init: str = spec("onehot", choices=("onehot", "soft_plan"),
                               help="initial cross labels: one-hot OT argmax (code) or the row-normalised plan (Q4)")
        visible_streams: int = spec(2, min=1, max=2,
                                    help="2: normal + channel-augmented visible stream in every visible term "
                                         "(code); 1: Eq. 14/17/19 as written (Q7)")
        oclr_cross_stream: bool = spec(True, help="OCLR target from the other visible stream (code)")
        oclr_detach_target: bool = spec(False, help="stop the gradient of the OCLR targets (code: not detached, Q8)")
        memory_grad: str = spec("live", choices=("live", "snapshot"),
                                help="input gradient with the memory as updated by later calls (code, Q10) or "
                                     "the start-of-iteration memory")
        bn_groups: int = spec(1, min=1, max=2,
                              help="2: BatchNorm over two halves of the batch as the official 2-GPU DataParallel "
                                   "run ([vis ; ir first half], [aug ; ir second half]), running statistics from "
                                   "the first (Q9); needs visible_streams 2")
        use_im: bool = spec(True, help="ablation: the intra (M̃) and intra-cross (M̂) terms")
        use_cm: bool = spec(True, help="ablation: the cross-memory terms on M^a")
        use_oclr: bool = spec(True, help="ablation: the OCLR terms")

    def __init__(self, params, context):
        super().__init__(params, context)
        for name in (*MEMORY_SPACE, "hard_v", "hard_r", "hardx_v", "hardx_r", "soft_v", "soft_r", "softx_v",
                     "softx_r"):
            self.register_buffer(name, None)
        self.epoch, self.stage, self.mode = 0, 1, "V"
        self.db_labels: dict | None = None
        self._no_clusters: list[str] = []
        # stage-2 batches; each process draws its own (the engine gathers the global batch)
        self.generator = torch.Generator().manual_seed(int(context.seed) * 1_000_003 + 29 + 7919 * int(context.rank))
        self._info: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- per epoch
    def start_epoch(self, epoch):
        self.epoch = epoch
        self.stage = 1 if epoch < self.params.stage_one_epochs else 2
        self.mode = "V" if epoch % 2 == 0 else "R"
        self._info = {"stage": float(self.stage)}
        if self.stage == 2:
            self._info["mode_v"] = float(self.mode == "V")

    def pseudo_label(self, features):
        """Per-modality sparse Jaccard + DBSCAN (the distance is kept for the homogeneous affinity); stage 1 returns
        the DBSCAN labels, stage 2 the MULT intra labels ℓ_v, ℓ_r of every instance."""
        c, p = self.ctx.config.cluster, self.params
        feats = {m: features[m]["feature"].float() for m in MODALITIES}
        dist, labels = {}, {}
        with self.ctx.timed("cluster"):
            for m in MODALITIES:
                n = feats[m].shape[0]
                k1 = min(c.k1, n - 1)
                dist[m] = kreciprocal_jaccard(feats[m], k1=k1, k2=min(c.k2, k1), sparse=True)
                labels[m] = dbscan(dist[m], c.eps, c.min_samples).cpu()
        self.db_labels = labels
        self._no_clusters = [str(m) for m in MODALITIES if not bool((labels[m] >= 0).any())]
        if self.stage == 1 or self._no_clusters:
            return labels
        with self.ctx.timed("associate"):
            if p.homog_affinity == "soft_jaccard":
                affinity = {m: homogeneous_affinity(dist[m]) for m in MODALITIES}
            else:
                affinity = {m: kreciprocal_set_affinity(feats[m], c.k1) for m in MODALITIES}
            del dist
            result = mult_association(
                feats[VISIBLE], feats[INFRARED], labels[VISIBLE], labels[INFRARED], affinity[VISIBLE],
                affinity[INFRARED], alpha=p.alpha, init_temp=p.init_temp, lam=p.ot_lambda, ot_stop=p.sinkhorn_stop,
                ot_max_iter=p.ot_max_iter, ot_tol=p.ot_tol, lp_max_iter=p.lp_max_iter, lp_tol=p.lp_tol,
                lp_order=p.lp_order, cross_init=p.cross_init, init_centroids=p.init_label_centroids,
                block_bytes=p.ot_block_mb << 20, cache_bytes=p.ot_cache_mb << 20)
            device = self.ctx.device
            for name, matrix in (("_v", result.y_v), ("_r", result.y_r), ("x_v", result.yh_v), ("x_r", result.yh_r)):
                hard, soft = soft_labels(matrix, p.beta)
                setattr(self, f"hard{name}", hard.to(device))
                setattr(self, f"soft{name}", soft.to(device))
            self._info.update({k: float(v) for k, v in result.info.items()})
            for m, key in ((VISIBLE, "v"), (INFRARED, "r")):
                moved = (labels[m] >= 0) & (getattr(self, f"hard_{key}").cpu() != labels[m])
                self._info[f"moved/{m}"] = float(moved.sum())
        return {VISIBLE: self.hard_v.cpu(), INFRARED: self.hard_r.cpu()}

    def shared_label_spaces(self, labels):
        # Reporting only: the V-space labels of both modalities (visible ℓ_v, infrared ℓ̂_r), so the engine scores the
        # transfer's cross-modality pairs; stage 1 (and a skipped epoch) has no cross-modality link.
        del labels
        if self.stage == 1 or self._no_clusters:
            return {}
        return {"": (self.hard_v.cpu(), self.hardx_r.cpu())}

    def build_memories(self, features, labels):
        """Memories from the normalised DBSCAN centroids (``labels`` — MULT's — are not used for them)."""
        del labels
        device = self.ctx.device
        centres = {m: cluster_means(features[m]["feature"], self.db_labels[m]).to(device) for m in MODALITIES}
        self.memory_v, self.memory_r = centres[VISIBLE], centres[INFRARED]
        if self.stage == 2:
            self.memory_va, self.memory_rcm = centres[VISIBLE].clone(), centres[VISIBLE].clone()
            self.memory_ra, self.memory_vcm = centres[INFRARED].clone(), centres[INFRARED].clone()

    def batch_sampler(self, labels, epoch):
        if self.stage == 1:
            return super().batch_sampler(labels, epoch)
        if self._no_clusters:
            self.ctx.log(f"epoch {epoch + 1}: no {' / '.join(self._no_clusters)} clusters (all outliers), so no label "
                         "transfer; skipping training this epoch — raise cluster.eps or lower cluster.min_samples")
            return None
        t = self.ctx.config.train
        batches = mult_batches({"V": self.hard_v.cpu(), "R": self.hardx_v.cpu()},
                               {"V": self.hardx_r.cpu(), "R": self.hard_r.cpu()},
                               t.num_identities, t.num_instances, t.iters, self.generator)
        if batches is None:
            self.ctx.log(f"epoch {epoch + 1}: no label is held by both modalities in either label space; skipping "
                         "training this epoch")
            return None
        return {VISIBLE: batches[0], INFRARED: batches[1]}

    def end_epoch(self, epoch):
        del epoch
        return dict(self._info)

    # ----------------------------------------------------------------------------------------------- per iteration
    def encode(self, batch):
        """{"vis", "aug", "ir"} (B, D) float32 training features (one forward; "aug" in stage 1 — DCL's three
        terms — and in stage 2 with two visible streams), gathered over processes."""
        ctx = self.ctx
        views = [ctx.augment["train"](batch.visible_images)]
        if self.params.visible_streams == 2 or self.stage == 1:
            views.append(ctx.augment["channel"](batch.visible_images))
        views.append(ctx.augment["train"](batch.infrared_images))
        sizes = [v.shape[0] for v in views]
        names = ("vis", "aug", "ir") if len(views) == 3 else ("vis", "ir")
        if self.params.bn_groups == 2 and len(views) == 3:
            parts = self._two_bn_groups(*views)
        else:
            modality = torch.cat([torch.full((s,), int(i == len(views) - 1), dtype=torch.long)
                                  for i, s in enumerate(sizes)]).to(views[0].device)
            with ctx.autocast():
                parts = ctx.model(torch.cat(views), modality).float().split(sizes)
        return {name: ctx.gather(part) for name, part in zip(names, parts, strict=True)}

    def _two_bn_groups(self, x_vis, x_aug, x_ir):
        """The official two-GPU DataParallel split (Q9): forward [vis ; first half of ir] and [aug ; second half of
        ir] separately (BatchNorm statistics per group); the running statistics keep only the first group's update
        (the replica on GPU 0). Returns (vis, aug, ir) float32 features."""
        ctx = self.ctx
        half = (x_ir.shape[0] + 1) // 2
        groups = ((x_vis, x_ir[:half]), (x_aug, x_ir[half:]))
        feats, kept = [], None
        for g, (vis, ir) in enumerate(groups):
            modality = torch.cat([torch.zeros(vis.shape[0], dtype=torch.long),
                                  torch.ones(ir.shape[0], dtype=torch.long)]).to(vis.device)
            with ctx.autocast():
                feats.append(ctx.model(torch.cat([vis, ir]), modality).float())
            if g == 0:
                kept = {k: v.clone() for k, v in ctx.encoder.state_dict().items()
                        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        with torch.no_grad():
            state = ctx.encoder.state_dict()
            for k, v in kept.items():
                state[k].copy_(v)
        nv = x_vis.shape[0]
        return feats[0][:nv], feats[1][:nv], torch.cat([feats[0][nv:], feats[1][nv:]])

    def stage_one_losses(self, feats, y_vis, y_ir):
        p = self.params
        out = {}
        for name, key, memory, labels in (("visible", "vis", self.memory_v, y_vis), ("augmented", "aug",
                                           self.memory_v, y_vis), ("infrared", "ir", self.memory_r, y_ir)):
            keep = labels >= 0
            if bool(keep.any()):
                out[name] = memory_contrastive(feats[key][keep], labels[keep], memory, temp=p.temp,
                                               momentum=p.momentum)
        return out

    def _labels(self, stream: str, space: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard (B,), soft (B, K)) labels of a stream's samples in a label space."""
        visible = stream != "ir"
        key = {(True, "V"): "_v", (True, "R"): "x_v", (False, "V"): "x_r", (False, "R"): "_r"}[(visible, space)]
        index = index.to(self.ctx.device)
        return getattr(self, f"hard{key}")[index], getattr(self, f"soft{key}")[index]

    def _call(self, memory_name: str, feats: torch.Tensor, hard: torch.Tensor | None) -> torch.Tensor:
        """Logits f̂ M^T / τ as one autograd node; with ``hard`` labels its backward (gradient with the live memory,
        or the start-of-iteration copy for ``memory_grad: snapshot``) then updates the memory sequentially."""
        p = self.params
        live = getattr(self, memory_name)
        x = F.normalize(feats, dim=1)
        if hard is None:  # fixed logits: the forward-time buffer, no update
            return MemoryLogits.apply(x, live.clone(), None) / p.temp
        momentum = p.momentum_cross if memory_name in ("memory_va", "memory_ra") else p.momentum

        def step(xd: torch.Tensor) -> None:
            memory_update(xd, hard, live, momentum=momentum, update="sequential", normalized=True)

        grad_memory = live if p.memory_grad == "live" else live.clone()
        return MemoryLogits.apply(x, grad_memory, step) / p.temp

    def stage_two_losses(self, feats, index_vis, index_ir) -> dict[str, torch.Tensor]:
        """The enabled terms of the epoch's mode from the streams' (B, D) features and dataset indices (B,)."""
        p = self.params
        calls, terms = mode_plan(self.mode, use_im=p.use_im, use_cm=p.use_cm, use_oclr=p.use_oclr,
                                 visible_streams=p.visible_streams, cross_stream=p.oclr_cross_stream)
        index = {"vis": index_vis, "aug": index_vis, "ir": index_ir}
        labels = {}
        for memory, stream in set(calls) | {t[2] for t in terms}:
            labels[(memory, stream)] = self._labels(stream, MEMORY_SPACE[memory], index[stream])
        logits = {}
        for memory, stream in calls:  # forward order = the reverse of the update order
            logits[(memory, stream)] = self._call(memory, feats[stream], labels[(memory, stream)][0])
        out = {}
        for tid, kind, key, target in terms:
            if kind == "ce":
                out[tid] = soft_cross_entropy(logits[key], labels[key][1])
                continue
            memory, stream, updating = target
            z_t = logits[(memory, stream)] if updating else self._call(memory, feats[stream], None)
            out[tid] = oclr_term(logits[key], z_t, p.oclr_sharpen, p.oclr_detach_target)
        return out

    def training_step(self, batch):
        feats = self.encode(batch)
        if self.stage == 1:
            return self.stage_one_losses(feats, self.ctx.gather(batch.visible_labels),
                                         self.ctx.gather(batch.infrared_labels))
        index_vis = self.ctx.gather(batch.visible_indices.to(self.ctx.device))
        index_ir = self.ctx.gather(batch.infrared_indices.to(self.ctx.device))
        return self.stage_two_losses(feats, index_vis, index_ir)


@register_method("mult_paper")
class MULTPaper(MULT):
    """The paper's equations: Eq. 5 set-Jaccard homogeneous affinity, initial labels from the normalised prototypes,
    the OT plan as initial cross labels, Jacobi transfer, converged Sinkhorn, one visible stream, detached OCLR
    targets, gradients with the start-of-iteration memories."""

    @dataclass
    class Params(MULT.Params):
        name: str = spec("mult_paper", help="the registered method name")
        homog_affinity: str = spec("hard_kreciprocal", choices=("soft_jaccard", "hard_kreciprocal"), help="see mult")
        init_label_centroids: str = spec("normalized", choices=("raw", "normalized"), help="see mult")
        cross_init: str = spec("soft_plan", choices=("onehot", "soft_plan"), help="see mult")
        lp_order: str = spec("jacobi", choices=("gauss_seidel", "jacobi"), help="see mult")
        sinkhorn_stop: str = spec("tol", choices=("community", "tol"), help="see mult")
        ot_max_iter: int = spec(1000, min=1, help="see mult")
        ot_tol: float = spec(1e-6, min=0.0, help="see mult")
        visible_streams: int = spec(1, min=1, max=2, help="see mult")
        oclr_detach_target: bool = spec(True, help="see mult")
        memory_grad: str = spec("snapshot", choices=("live", "snapshot"), help="see mult")
