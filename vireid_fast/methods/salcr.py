"""SALCR: semantic-aligned learning with collaborative refinement (He, Cheng et al., IJCV 2025, arXiv 2504.19244),
after the exact description in ``shared/spec/methods/salcr.md`` (paper equations and the official code
``FranklinLingfeng/code-for-SALCR``).

Two stages in one run (global epoch ``e < stage1_epochs`` = stage 1):

* stage 1 is the DCL baseline (:class:`~vireid_fast.methods.DCL`: per-modality clusters, visible / channel-augmented /
  infrared memory terms, the engine's P x K batches per modality);
* stage 2 re-creates the part head (:class:`PartHead`: Np learnable prototypes, instance-adaptive queries Eq. 9,
  query-guided attention Eq. 10-11 over the stage-4 map, BN_p) and trains on cross-modality pairs (v_j, a_j, r_j):
  DAGL (optional CMFP on the non-outlier globals, unnormalised propagated centres, Sinkhorn with the community stop
  rule in both directions, intra labels refined by the dot product with the centres) gives every instance an
  intra-modality and a cross-modality label; L_g on the two global memories, FGSAL on 4 Np part memories, GPCR on
  read-only instance memories with kNN-intersection positive sets.

Presets: ``salcr`` (official code) and ``salcr_paper`` (the paper's equations). Every paper-vs-code difference of the
spec's §7/§9 is a key of :class:`SALCR.Params`. Nothing here builds an N x N or N_v x N_r matrix: CMFP is the sparse
op, the plans are N_v x K^r and N_r x K^v, positive sets are batch x N masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.samplers import CrossModalityPairSampler
from ..data.transforms import ChannelAugmentation
from ..memory._function import MemoryLogits
from ..modality import INFRARED, MODALITIES, VISIBLE
from ..ops import cmfp, memory_update, ot_assign
from ..schema import spec
from .base import register_method
from .clustering import count_clusters, jaccard_dbscan
from .dcl import DCL

__all__ = ["SALCR", "PartHead", "SALCRPaper", "cluster_term", "dagl_associate", "positive_set_terms",
           "reduce_rows", "top_k_from_scores", "top_k_mask"]

#: Row order of the nine (map, query) part families: blocks by map v, a, r, inside by query v, a, r.
FAMILIES = tuple((m, q) for m in "var" for q in "var")


class PartHead(nn.Module):
    """SALCR's part module (SAFL + QueryAttention): Np prototypes pi (Np, d) and BN_p over the Np d concatenation.

    Maps are (B, d, H, W) stage-4 outputs; parts are contiguous blocks of L = floor(HW / Np) row-major pixels (the
    remainder dropped). ``queries`` is Eq. 9, ``attend`` Eq. 10-11, ``normalize`` BN_p (bias frozen at 0, weight
    drawn from N(1, 0.01)).
    """

    def __init__(self, dim: int, num_parts: int):
        super().__init__()
        self.dim, self.num_parts = int(dim), int(num_parts)
        self.prototypes = nn.Parameter(torch.empty(num_parts, dim))
        self.bn = nn.BatchNorm1d(num_parts * dim)
        self.bn.bias.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw pi (Kaiming normal, std sqrt(2/d)) and BN_p (weight N(1, 0.01), bias 0, fresh running stats)."""
        with torch.no_grad():
            nn.init.kaiming_normal_(self.prototypes)
            self.bn.reset_parameters()
            nn.init.normal_(self.bn.weight, 1.0, 0.01)
            nn.init.zeros_(self.bn.bias)

    def split(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B, Np, L, d) float32 part pixels, pixel index h W + w."""
        b, d, h, w = maps.shape
        length = (h * w) // self.num_parts
        if length < 1:
            raise ValueError(f"method.num_parts={self.num_parts} exceeds the {h}x{w} stage-4 map's {h * w} pixels; "
                             "lower num_parts or raise data.image_size")
        flat = maps.float().flatten(2).transpose(1, 2)
        return flat[:, : length * self.num_parts].reshape(b, self.num_parts, length, d)

    def queries(self, parts: torch.Tensor) -> torch.Tensor:
        """Eq. 9: (B, Np, L, d) -> (B, Np, d), q = sum_l sigma(pi_p . F_l) F_l / sum_l sigma(pi_p . F_l)."""
        alpha = torch.sigmoid(torch.einsum("pd,bpld->bpl", self.prototypes, parts))
        return torch.einsum("bpl,bpld->bpd", alpha, parts) / alpha.sum(2, keepdim=True)

    @staticmethod
    def attend(queries: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """Eq. 10-11: (B, Np, d) queries on (B, Np, L, d) maps -> (B, Np, d), f = softmax(q F^T / sqrt(d)) F."""
        beta = torch.softmax(torch.einsum("bpd,bpld->bpl", queries, parts) / math.sqrt(parts.shape[-1]), dim=2)
        return torch.einsum("bpl,bpld->bpd", beta, parts)

    def normalize(self, pooled: torch.Tensor) -> torch.Tensor:
        """BN_p over the (B, Np d) concatenation, split back to (B, Np, d) (one batch-statistics pass)."""
        b = pooled.shape[0]
        return self.bn(pooled.reshape(b, -1)).reshape(b, self.num_parts, self.dim)

    def own(self, maps: torch.Tensor) -> torch.Tensor:
        """Eval-mode parts f^{mm}: each image's own query on its own map, after BN_p, (B, Np, d)."""
        parts = self.split(maps)
        return self.normalize(self.attend(self.queries(parts), parts))


def top_k_mask(x: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """T_k(x; M) as a (B, N) bool mask: entries of normalize(x) M^T strictly above the row's (k+1)-th largest value
    (ties at the boundary are not broken; all N when N <= k). x: (B, d), bank: (N, d) L2-normalised rows."""
    return top_k_from_scores(F.normalize(x.detach().float(), dim=1) @ bank.t(), k)


def top_k_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: entries strictly above the row's (k+1)-th largest score (all N when N <= k)."""
    scores = scores.detach()
    if scores.shape[1] <= k:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, k + 1, dim=1).values[:, k:k + 1]
    return scores > threshold


def positive_set_terms(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row PS = logsumexp_j l_j - logsumexp_{i in P} l_i (= -log sum_P softmax) and whether P is non-empty.

    logits (B, N), mask (B, N) bool. Rows with an empty P get 0 and valid False."""
    valid = mask.any(1)
    # an empty row takes every entry (a finite value whose gradient is then zeroed), never logsumexp(-inf) = NaN
    picked = torch.logsumexp(logits.masked_fill(~(mask | ~valid[:, None]), float("-inf")), dim=1)
    per_row = torch.logsumexp(logits, dim=1) - picked
    return torch.where(valid, per_row, torch.zeros_like(per_row)), valid


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, norm: str) -> torch.Tensor:
    """Mean of the valid rows (``norm="reference"``: one mean over all of them) or the sum over groups of each
    group's mean (``"paper"``: per-set means summed); a set without valid rows contributes 0, never NaN.

    per_row (B,), valid (B,) bool, groups (B,) int64 family ids."""
    w = valid.to(per_row.dtype)
    if norm == "reference":
        return (per_row * w).sum() / w.sum().clamp(min=1.0)
    num = int(groups.max()) + 1
    sums = torch.zeros(num, dtype=per_row.dtype, device=per_row.device).index_add(0, groups, per_row * w)
    counts = torch.zeros(num, dtype=per_row.dtype, device=per_row.device).index_add(0, groups, w)
    return (sums / counts.clamp(min=1.0)).sum()


def cluster_term(x: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, groups: torch.Tensor, *, temp: float,
                 momentum: float, norm: str, order: torch.Tensor | None) -> torch.Tensor:
    """One call of a cluster memory: CE(normalize(x) M^T / temp, targets) reduced by :func:`reduce_rows`; backward
    computes the input gradient with M as it is, then walks the rows in ``order`` (a permutation of 0..B-1; None =
    batch order) with M[y] <- normalize(mu M[y] + (1 - mu) x_hat) (:func:`vireid_fast.ops.memory_update`).

    x (B, d) float32 with grad, targets (B,) int64 in [0, C), memory (C, d) float32 contiguous buffer."""
    xn = F.normalize(x.float(), dim=1)
    perm = torch.arange(x.shape[0], device=x.device) if order is None else order.to(x.device)
    y = targets.to(x.device)

    def update(xd):
        memory_update(xd[perm], y[perm], memory, momentum=momentum, update="sequential", normalized=True)

    logits = MemoryLogits.apply(xn, memory, update) / temp
    per_row = F.cross_entropy(logits, y, reduction="none")
    return reduce_rows(per_row, torch.ones_like(y, dtype=torch.bool), groups, norm)


def _centres(features: torch.Tensor, labels: torch.Tensor, num: int) -> torch.Tensor:
    """(num, d) float32 unnormalised mean of each label 0..num-1 (label -1 skipped; an empty label gives 0)."""
    keep = labels >= 0
    # outliers go to an extra row that is dropped, so the (N, d) features are never copied
    target = torch.where(keep, labels, torch.full_like(labels, num))
    sums = torch.zeros(num + 1, features.shape[1], dtype=torch.float32).index_add_(0, target, features.float())
    counts = torch.bincount(labels[keep], minlength=num).clamp(min=1).float()
    return sums[:num] / counts[:, None]


def dagl_associate(visible: torch.Tensor, infrared: torch.Tensor, labels_v: torch.Tensor, labels_r: torch.Tensor, *,
                   cmfp_k: int | None, lam: float = 5.0, center_norm: bool = False, refine: bool = True,
                   stop: str = "reference") -> dict[str, torch.Tensor]:
    """DAGL (spec §4.1) on non-outlier features.

    visible (N_v, d), infrared (N_r, d): L2-normalised globals; labels_v (N_v,) in [0, K^v), labels_r (N_r,) in
    [0, K^r): DBSCAN labels. cmfp_k: CMFP(tr) neighbours (None = off). Returns ``intra_v`` (N_v,), ``cross_v`` (N_v,)
    in [0, K^r), ``intra_r``, ``cross_r`` in [0, K^v), and the centres ``centres_v`` (K^v, d), ``centres_r``.
    """
    if cmfp_k is not None:
        prop = cmfp(visible.float(), infrared.float(), int(cmfp_k))
        fv, fr = F.normalize(prop.prop_v, dim=1), F.normalize(prop.prop_r, dim=1)
    else:
        fv, fr = visible.float(), infrared.float()
    kv, kr = int(labels_v.max()) + 1, int(labels_r.max()) + 1
    cv, cr = _centres(fv, labels_v, kv), _centres(fr, labels_r, kr)
    if center_norm:
        cv, cr = F.normalize(cv, dim=1), F.normalize(cr, dim=1)
    options = {"stop": stop, "max_iter": 500, "tol": 0.1} if stop == "reference" else \
        {"stop": stop, "max_iter": 10000, "tol": 1e-6}
    cross_v, _ = ot_assign(fv, cr, lam, **options)
    cross_r, _ = ot_assign(fr, cv, lam, **options)
    intra_v = (fv @ cv.t()).argmax(1) if refine else labels_v.clone()
    intra_r = (fr @ cr.t()).argmax(1) if refine else labels_r.clone()
    return {"intra_v": intra_v, "cross_v": cross_v, "intra_r": intra_r, "cross_r": cross_r, "centres_v": cv,
            "centres_r": cr}


def _scatter_labels(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.full((keep.shape[0],), -1, dtype=torch.int64)
    out[keep] = values.to(torch.int64).cpu()
    return out


@register_method("salcr")
class SALCR(DCL):
    """Config keys: see ``Params`` (help strings) and docs/methods.md."""

    normalized_embeddings = ("feature", "pg")

    @dataclass
    class Params(DCL.Params):
        name: str = spec("salcr", help="the registered method name")
        momentum_cross: float = spec(0.1, min=0.0, max=0.999, help="momentum of the 4 Np part memories")
        stage1_epochs: int = spec(40, min=0, help="epochs of the DCL stage before SALCR (stage 2)")
        stage1_only: bool = spec(False, help="ablation row B: the DCL baseline for every epoch")
        pair_identities: int = spec(8, min=2, help="P: pseudo-labels per stage-2 batch, half from each label space")
        pair_instances: int = spec(8, min=1, help="K: pairs per pseudo-label (S = P K pairs, 3 S images)")
        num_parts: int = spec(3, min=1, help="Np part prototypes")
        lambda_ot: float = spec(5.0, min=0.0, min_exclusive=True, help="lambda of the Sinkhorn plan")
        cmfp_train: bool = spec(True, help="CMFP(tr) before the transport")
        k_train: int = spec(30, min=1, help="CMFP(tr) neighbours (30 SYSU, 8 RegDB; clipped to min(N_v, N_r))")
        fgsal: bool = spec(True, help="the part-prototype loss L_fgsal")
        gpcr: bool = spec(True, help="the instance loss L_gpcr")
        gpcr_terms: str = spec("both", choices=("both", "global", "part"), help="Table 7: GPCR terms kept")
        lambda_gpcr: float = spec(0.5, min=0.0, help="lambda of L_gpcr (Eq. 30)")
        k_instance: int = spec(30, min=1, help="k of the GPCR top-k neighbour sets")
        branch: str = spec("dual", choices=("dual", "visible", "infrared"), help="Table 4: DAGL branch of L_g")
        ra_slot: str = spec("reference", choices=("reference", "fixed"),
                            help="f^{ra} slot: f^{va} again (the trainer's slicing bug) or f^{ra}")
        loss_norm: str = spec("reference", choices=("reference", "paper"),
                              help="one mean per memory call (code) or per-set means summed (paper)")
        gpcr_global_views: int = spec(3, choices=(2, 3), help="views intersected for the global positive sets")
        refine_intra_labels: bool = spec(True, help="intra labels <- nearest propagated centre (code)")
        ot_center_norm: bool = spec(False, help="L2-normalise the transport centres (paper: prototypes)")
        sinkhorn_stop: str = spec("reference", choices=("reference", "converged"),
                                  help="community stop rule (tol 0.1 every 10 iterations, cap 500) or converged")
        instance_memory_update: str = spec("none", choices=("none", "momentum"),
                                           help="instance memories read-only (code) or momentum-updated")
        instance_momentum: float = spec(0.1, min=0.0, max=0.999, help="mu_I with instance_memory_update=momentum")
        shuffle_updates: bool = spec(True, help="stage-2 memories update in a random row order (code cross=True)")

    def __init__(self, params, context):
        super().__init__(params, context)
        p = params
        if p.pair_identities % 2:
            raise ValueError(f"method.pair_identities must be even (half the pseudo-labels of a stage-2 batch come "
                             f"from each label space), got {p.pair_identities}; use {p.pair_identities + 1}")
        dim = context.encoder.feature_dim
        self.part_head = PartHead(dim, p.num_parts)
        self.raw_labels = None
        if context.world > 1:
            # the head runs before the gather on each rank's share: average its gradients as DDP does the encoder's
            for param in self.part_head.parameters():
                if param.requires_grad:
                    param.register_hook(_all_reduce_mean)
        # Stage-2 buffers, rebuilt every epoch (None until then; resized from a checkpoint).
        for name in ("cross_visible", "cross_infrared", "intra_visible", "intra_infrared", "part_vv", "part_vr",
                     "part_rv", "part_rr", "instance_v", "instance_r", "instance_vp", "instance_rp",
                     "row_visible", "row_infrared"):
            self.register_buffer(name, None)
        self.adapt_gray = ChannelAugmentation("adapt_gray", gray_p=0.5)
        self.epoch, self.stage = 0, 1
        self._epoch_info: dict[str, float] = {}
        self._empty_events = 0

    # ----------------------------------------------------------------------------------------------- schedule
    @property
    def stage1_epochs(self) -> int:
        return 1 << 30 if self.params.stage1_only else self.params.stage1_epochs

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.stage = 1 if epoch < self.stage1_epochs else 2
        self._epoch_info = {"stage": float(self.stage)}
        self._empty_events = 0
        if epoch == self.stage1_epochs:
            self.part_head.reset_parameters()  # pi and BN_p are re-created at stage 2

    def embed(self, model, images, modality):
        if self.stage == 1:
            return super().embed(model, images, modality)
        out = model(images, modality, outputs=("stage4", "feature"))
        head = self.part_head
        was_training = head.training
        head.eval()  # extraction must not move BN_p's running statistics
        try:
            parts = head.own(out["stage4"])
        finally:
            head.train(was_training)
        return {"feature": out["feature"], "pg": torch.cat([parts.flatten(1), out["feature"].float()], 1)}

    # ----------------------------------------------------------------------------------------------- per epoch
    def pseudo_label(self, features):
        if self.stage == 1:
            return super().pseudo_label(features)
        c = self.ctx.config.cluster
        with self.ctx.timed("cluster"):
            raw = {m: jaccard_dbscan(features[m]["feature"], k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples)
                   for m in MODALITIES}
        self.raw_labels = raw
        with self.ctx.timed("associate"):
            return self.associate(features, raw)

    def associate(self, features, labels):
        if self.stage == 1:
            return labels
        p = self.params
        keep = {m: labels[m] >= 0 for m in MODALITIES}
        if any(count_clusters(labels[m]) == 0 for m in MODALITIES):
            self.cross_visible = torch.full_like(labels[VISIBLE], -1)
            self.cross_infrared = torch.full_like(labels[INFRARED], -1)
            return labels
        gv = features[VISIBLE]["feature"][keep[VISIBLE]]
        gr = features[INFRARED]["feature"][keep[INFRARED]]
        k = min(p.k_train, gv.shape[0], gr.shape[0]) if p.cmfp_train else None
        out = dagl_associate(gv, gr, labels[VISIBLE][keep[VISIBLE]], labels[INFRARED][keep[INFRARED]], cmfp_k=k,
                             lam=p.lambda_ot, center_norm=p.ot_center_norm, refine=p.refine_intra_labels,
                             stop=p.sinkhorn_stop)
        self.cross_visible = _scatter_labels(out["cross_v"], keep[VISIBLE])
        self.cross_infrared = _scatter_labels(out["cross_r"], keep[INFRARED])
        intra = {VISIBLE: _scatter_labels(out["intra_v"], keep[VISIBLE]),
                 INFRARED: _scatter_labels(out["intra_r"], keep[INFRARED])}
        self._epoch_info.update({
            "dagl/refined_changed_visible": float((intra[VISIBLE] != labels[VISIBLE]).sum()),
            "dagl/refined_changed_infrared": float((intra[INFRARED] != labels[INFRARED]).sum())})
        return intra

    def build_memories(self, features, labels):
        if self.stage == 1:
            return super().build_memories(features, labels)
        p, device = self.params, self.ctx.device
        raw = self.raw_labels
        self.instance_v = None
        self.intra_visible, self.intra_infrared = labels[VISIBLE].clone(), labels[INFRARED].clone()
        if any(count_clusters(raw[m]) == 0 for m in MODALITIES):
            return
        kv, kr = int(raw[VISIBLE].max()) + 1, int(raw[INFRARED].max()) + 1
        dim = self.part_head.dim
        # global memories: normalised means of the raw DBSCAN labels (before refinement)
        self.memory_visible = F.normalize(_centres(features[VISIBLE]["feature"], raw[VISIBLE], kv), dim=1).to(device)
        self.memory_infrared = F.normalize(_centres(features[INFRARED]["feature"], raw[INFRARED], kr),
                                           dim=1).to(device)
        # part memories: slices of the mean of the whole-vector-normalised pg, each slice re-normalised
        pg_v = _centres(features[VISIBLE]["pg"], raw[VISIBLE], kv)[:, : p.num_parts * dim]
        pg_r = _centres(features[INFRARED]["pg"], raw[INFRARED], kr)[:, : p.num_parts * dim]
        part_v = F.normalize(pg_v.reshape(kv, p.num_parts, dim).transpose(0, 1), dim=2).contiguous()
        part_r = F.normalize(pg_r.reshape(kr, p.num_parts, dim).transpose(0, 1), dim=2).contiguous()
        self.part_vv, self.part_rv = part_v.to(device), part_v.clone().to(device)
        self.part_vr, self.part_rr = part_r.to(device), part_r.clone().to(device)
        # instance memories over the non-outliers (rows in dataset order)
        keep_v, keep_r = raw[VISIBLE] >= 0, raw[INFRARED] >= 0
        self.instance_v = features[VISIBLE]["feature"][keep_v].float().contiguous().to(device)
        self.instance_r = features[INFRARED]["feature"][keep_r].float().contiguous().to(device)
        self.instance_vp = self._part_bank(features[VISIBLE]["pg"], keep_v).to(device)
        self.instance_rp = self._part_bank(features[INFRARED]["pg"], keep_r).to(device)
        self.row_visible = torch.cumsum(keep_v.long(), 0) - 1
        self.row_infrared = torch.cumsum(keep_r.long(), 0) - 1

    def _part_bank(self, pg: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(Np, N_keep, d) float32: normalize(slice_p(pg_i)) of the kept rows, one part slice at a time (no copy of
        the whole (N, (Np + 1) d) pg)."""
        dim, rows = self.part_head.dim, torch.nonzero(keep).flatten()
        bank = torch.empty(self.params.num_parts, rows.numel(), dim, dtype=torch.float32)
        for part in range(self.params.num_parts):
            bank[part] = F.normalize(pg[:, part * dim:(part + 1) * dim].index_select(0, rows).float(), dim=1)
        return bank

    def shared_label_spaces(self, labels):
        """Stage 2: the visible space (intra visible, cross infrared) and the infrared space (cross visible, intra
        infrared) the pairs are drawn from."""
        del labels
        if self.stage == 1 or self.cross_visible is None or self.intra_visible is None:
            return {}
        return {"visible_space": (self.intra_visible.cpu(), self.cross_infrared.cpu()),
                "infrared_space": (self.cross_visible.cpu(), self.intra_infrared.cpu())}

    def batch_sampler(self, labels, epoch):
        if self.stage == 1:
            return super().batch_sampler(labels, epoch)
        ctx, p = self.ctx, self.params
        iters = ctx.config.train.iters
        if self.instance_v is None or self.cross_visible is None or self.instance_v.shape[0] == 0:
            ctx.log(f"epoch {epoch + 1}: no clusters in a modality; skipping training this epoch")
            return None
        spaces = ((self.intra_visible, self.cross_infrared), (self.cross_visible, self.intra_infrared))
        samplers = []
        for space, (vis, ir) in enumerate(spaces):
            shared = len(set(vis[vis >= 0].tolist()) & set(ir[ir >= 0].tolist()))
            half = min(p.pair_identities // 2, shared)
            if half == 0:
                ctx.log(f"epoch {epoch + 1}: no pseudo-label of the {MODALITIES[space]} space holds images of both "
                        "modalities; skipping training this epoch")
                return None
            sampler = CrossModalityPairSampler(vis.numpy(), ir.numpy(), half, p.pair_instances,
                                               seed=ctx.seed * 7919 + 31 * space + 2 * ctx.rank + 1,
                                               num_batches=iters)
            sampler.set_epoch(epoch)
            samplers.append(sampler)
        visible_batches, infrared_batches = [], []
        for (va, ra), (vb, rb) in zip(samplers[0].pairs(), samplers[1].pairs(), strict=True):
            visible_batches.append(va + vb)
            infrared_batches.append(ra + rb)
        return {VISIBLE: visible_batches, INFRARED: infrared_batches}

    def end_epoch(self, epoch):
        del epoch
        info = dict(self._epoch_info)
        if self.stage == 2:
            info["gpcr/empty_batches"] = float(self._empty_events)
        return info

    # ----------------------------------------------------------------------------------------------- per iteration
    def _order(self, n: int, device) -> torch.Tensor | None:
        return torch.randperm(n).to(device) if self.params.shuffle_updates else None

    def encode_pairs(self, visible_images, infrared_images):
        """Forward of S pairs as one [v; a; r] batch: globals (3S, d) and the nine part families per (map, query),
        each (3S... sliced to S, Np, d) after BN_p (three BN passes), gathered over processes block by block."""
        ctx = self.ctx
        s = visible_images.shape[0]
        xv = ctx.augment["train"](visible_images)
        xa = self.rgb_exchange_only(ctx.augment["train"](visible_images))
        xr = self.adapt_gray(ctx.augment["train"](infrared_images))
        images = torch.cat([xv, xa, xr])
        modality = torch.cat([torch.zeros(2 * s, dtype=torch.long), torch.ones(s, dtype=torch.long)]).to(xv.device)
        with ctx.autocast():
            out = ctx.model(images, modality, outputs=("stage4", "feature"))
        g = out["feature"].float()
        head = self.part_head
        parts = head.split(out["stage4"])
        q = head.queries(parts)
        v, a, r = torch.arange(s), torch.arange(s, 2 * s), torch.arange(2 * s, 3 * s)
        fam = {}
        # pass A: own maps; pass B: rows v, a on r's map and r on v's; pass C: v on a's, a on v's, r on a's
        for maps, names in (((v, a, r), ("vv", "aa", "rr")), ((r, r, v), ("rv", "ra", "vr")),
                            ((a, v, a), ("av", "va", "ar"))):
            f = head.normalize(head.attend(q, parts[torch.cat(maps).to(parts.device)]))
            for block, name in enumerate(names):
                fam[name] = ctx.gather(f[block * s:(block + 1) * s])
        return ctx.gather(g[:s]), ctx.gather(g[s:2 * s]), ctx.gather(g[2 * s:]), fam

    def rgb_exchange_only(self, x):
        """Channel exchange restricted to R, G or B copied to all three channels (uniform; never grayscale)."""
        choice = torch.randint(0, 3, (x.shape[0],))
        mixing = F.one_hot(choice, 3).float()[:, None, :].expand(x.shape[0], 3, 3).to(x.device, x.dtype)
        return torch.einsum("bij,bjhw->bihw", mixing, x)

    def global_loss(self, gv, ga, gr, yv, yv_x, yr, yr_x):
        """L_g (spec §2.1): the 3S globals on M^v with [y_v; y_v; yhat_r] and on M^r with [yhat_v; yhat_v; y_r]."""
        p = self.params
        s = gv.shape[0]
        x = torch.cat([gv, ga, gr])
        kind = torch.cat([torch.zeros(2 * s, dtype=torch.long), torch.ones(s, dtype=torch.long)]).to(x.device)
        terms = []
        rows_v = torch.arange(2 * s if p.branch == "infrared" else 3 * s, device=x.device)
        rows_r = torch.arange(2 * s, 3 * s, device=x.device) if p.branch == "visible" else \
            torch.arange(3 * s, device=x.device)
        y_v = torch.cat([yv, yv, yr_x])
        y_r = torch.cat([yv_x, yv_x, yr])
        for rows, y, memory in ((rows_v, y_v, self.memory_visible), (rows_r, y_r, self.memory_infrared)):
            terms.append(cluster_term(x[rows], y[rows], memory, kind[rows], temp=p.temp, momentum=p.momentum,
                                      norm=p.loss_norm, order=self._order(rows.numel(), x.device)))
        return terms[0] + terms[1]

    def fgsal_loss(self, fam, yv, yv_x, yr, yr_x):
        """L_fgsal (spec §2.2): per part, V_p (6S rows of visible-side queries) and R_p (3S rows of IR queries) on
        the four part memories, averaged over the parts."""
        p = self.params
        slot4 = fam["va"] if p.ra_slot == "reference" else fam["ra"]
        v_rows = torch.cat([fam["vv"], fam["aa"], fam["rv"], slot4, fam["av"], fam["va"]])
        r_rows = torch.cat([fam["rr"], fam["vr"], fam["ar"]])
        s = yv.shape[0]
        dev = v_rows.device
        v_groups = torch.arange(6, device=dev).repeat_interleave(s)
        r_groups = torch.arange(3, device=dev).repeat_interleave(s)
        total = 0.0
        for part in range(p.num_parts):
            calls = ((v_rows, yv.repeat(6), self.part_vv, v_groups), (v_rows, yv_x.repeat(6), self.part_vr, v_groups),
                     (r_rows, yr_x.repeat(3), self.part_rv, r_groups), (r_rows, yr.repeat(3), self.part_rr, r_groups))
            for rows, y, bank, groups in calls:
                total = total + cluster_term(rows[:, part], y, bank[part], groups, temp=p.temp,
                                             momentum=p.momentum_cross, norm=p.loss_norm,
                                             order=self._order(rows.shape[0], dev))
        return total / p.num_parts

    def _instance_logits(self, x, bank, rows_of=None):
        """normalize(x) M_I^T / temp; read-only unless instance_memory_update=momentum (then the batch's own rows
        move, sequentially in batch order, after the input gradient)."""
        p = self.params
        xn = F.normalize(x.float(), dim=1)
        if p.instance_memory_update == "none" or rows_of is None:
            return xn @ bank.t() / p.temp
        valid = rows_of >= 0

        def update(xd):
            if bool(valid.any()):
                memory_update(xd[valid], rows_of[valid], bank, momentum=p.instance_momentum, update="sequential",
                              normalized=True)

        return MemoryLogits.apply(xn, bank, update) / p.temp

    def _count_empty(self, valid):
        if not bool(valid.any()):
            self._empty_events += 1

    def _own_rows(self, rows: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
        """(blocks S,) bank rows to update: ``rows`` (S,) at block ``block``, -1 elsewhere."""
        out = torch.full((blocks, rows.shape[0]), -1, dtype=torch.int64, device=rows.device)
        out[block] = rows
        return out.flatten()

    def gpcr_global_loss(self, gv, ga, gr, rows_v=None, rows_r=None):
        """L_gi (spec §2.3): positive sets T_k(g_v) & T_k(g_a) & T_k(g_r) (paper: v and r only), shared by the
        pair's three rows, on M^v_I and M^r_I. rows_v / rows_r: (S,) instance-bank rows of the pairs' visible and
        infrared images (used only with instance_memory_update=momentum: v rows move M^v_I, r rows M^r_I)."""
        p = self.params
        x = torch.cat([gv, ga, gr])
        s = gv.shape[0]
        groups = torch.arange(3, device=x.device).repeat_interleave(s)
        own_v = None if rows_v is None else self._own_rows(rows_v, 0, 3)
        own_r = None if rows_r is None else self._own_rows(rows_r, 2, 3)
        total = 0.0
        for bank, rows_of in ((self.instance_v, own_v), (self.instance_r, own_r)):
            logits = self._instance_logits(x, bank, rows_of)
            near = top_k_from_scores(logits, p.k_instance).view(3, s, -1)  # by view v, a, r
            mask = near[0] & near[2]
            if p.gpcr_global_views == 3:
                mask = mask & near[1]
            per_row, valid = positive_set_terms(logits, mask.repeat(3, 1))
            self._count_empty(valid)
            total = total + reduce_rows(per_row, valid, groups, p.loss_norm)
        return total

    def gpcr_part_loss(self, gv, ga, gr, fam, rows_v=None, rows_r=None):
        """L_pi (spec §2.3): for each of the 9S rows f^{mq}, P = T_k(g^q; M_I) & (T_k(f^{m'q}; M^p_I) |
        T_k(f^{m''q}; M^p_I)) with {m', m''} the other two maps, on both modalities' banks, averaged over parts.
        rows_v / rows_r as in :meth:`gpcr_global_loss` (momentum option: f^{vv} rows move M^{vp}_I, f^{rr} rows
        M^{rp}_I)."""
        p = self.params
        fam = dict(fam)
        if p.ra_slot == "reference":
            fam["ra"] = fam["va"]
        s = gv.shape[0]
        dev = gv.device
        groups = torch.arange(9, device=dev).repeat_interleave(s)
        own_v = None if rows_v is None else self._own_rows(rows_v, FAMILIES.index(("v", "v")), 9)
        own_r = None if rows_r is None else self._own_rows(rows_r, FAMILIES.index(("r", "r")), 9)
        k = p.k_instance
        # the query's own global neighbours do not depend on the part: once per bank, (3, S, N) by query v, a, r
        near_g = [top_k_mask(torch.cat([gv, ga, gr]), bank, k).view(3, s, -1) for bank in
                  (self.instance_v, self.instance_r)]
        slot = {key: i for i, key in enumerate(FAMILIES)}
        total = 0.0
        for part in range(p.num_parts):
            x = torch.cat([fam[m + q][:, part] for m, q in FAMILIES])
            banks = ((self.instance_vp[part], own_v, near_g[0]), (self.instance_rp[part], own_r, near_g[1]))
            for bank_p, rows_of, glob_near in banks:
                logits = self._instance_logits(x, bank_p, rows_of)
                near = top_k_from_scores(logits, k).view(9, s, -1)  # the ranking of the logits is the cosine's
                masks = []
                for m, q in FAMILIES:
                    o1, o2 = (o for o in "var" if o != m)
                    masks.append(glob_near["var".index(q)] & (near[slot[(o1, q)]] | near[slot[(o2, q)]]))
                per_row, valid = positive_set_terms(logits, torch.cat(masks))
                self._count_empty(valid)
                total = total + reduce_rows(per_row, valid, groups, p.loss_norm)
        return total / p.num_parts

    def training_step(self, batch):
        if self.stage == 1:
            return super().training_step(batch)
        ctx, p = self.ctx, self.params
        gv, ga, gr, fam = self.encode_pairs(batch.visible_images, batch.infrared_images)
        dev = gv.device
        iv, ir = batch.visible_indices.cpu(), batch.infrared_indices.cpu()
        yv, yv_x = ctx.gather(self.intra_visible[iv].to(dev)), ctx.gather(self.cross_visible[iv].to(dev))
        yr, yr_x = ctx.gather(self.intra_infrared[ir].to(dev)), ctx.gather(self.cross_infrared[ir].to(dev))
        rows_v = rows_r = None
        if p.instance_memory_update == "momentum":
            rows_v, rows_r = ctx.gather(self.row_visible[iv].to(dev)), ctx.gather(self.row_infrared[ir].to(dev))
        losses = {"global": self.global_loss(gv, ga, gr, yv, yv_x, yr, yr_x)}
        if p.fgsal:
            losses["fgsal"] = self.fgsal_loss(fam, yv, yv_x, yr, yr_x)
        if p.gpcr and p.lambda_gpcr > 0:
            if p.gpcr_terms in ("both", "global"):
                losses["gpcr_global"] = p.lambda_gpcr * self.gpcr_global_loss(gv, ga, gr, rows_v, rows_r)
            if p.gpcr_terms in ("both", "part"):
                losses["gpcr_part"] = p.lambda_gpcr * self.gpcr_part_loss(gv, ga, gr, fam, rows_v, rows_r)
        return losses


def _all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


@register_method("salcr_paper")
class SALCRPaper(SALCR):
    """The paper's equations: per-set means summed, two-view global positive sets, f^{ra} in its slot, normalised
    transport centres, intra labels kept from DBSCAN, P=8 labels x K=4 pairs."""

    @dataclass
    class Params(SALCR.Params):
        name: str = spec("salcr_paper", help="the registered method name")
        pair_instances: int = spec(4, min=1, help="see salcr")
        ra_slot: str = spec("fixed", choices=("reference", "fixed"), help="see salcr")
        loss_norm: str = spec("paper", choices=("reference", "paper"), help="see salcr")
        gpcr_global_views: int = spec(2, choices=(2, 3), help="see salcr")
        refine_intra_labels: bool = spec(False, help="see salcr")
        ot_center_norm: bool = spec(True, help="see salcr")

