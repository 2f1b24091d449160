"""HIL: hierarchical identity learning (Pang et al., "Hierarchical Identity Learning for Unsupervised Visible-Infrared
Person Re-Identification"), after the exact description in ``shared/spec/methods/hil.md`` (paper Eq. 1-27 and the
official code ``haonanshi0125/HIL``).

Per epoch: raw deep (f) and shallow (g) embeddings of every training image; per-modality Jaccard + DBSCAN on
``z = normalize([f ; g])``; BRST relabels the visible images with the infrared clusters (row argmax kept only if it
reaches gamma times the column maximum); a shared cluster memory per branch over the unified clusters (pooled raw
means) and a C x (K+1) x D sub-centre buffer per branch (the mean row and K-means sub-centres ``w mean + (1 - w)
sub-mean``, :func:`sub_centres` over :func:`~vireid_fast.methods.hil_kmeans.batched_kmeans`); instance memories of
every image. Per iteration: identity contrast on the shared memories, neighbour contrast on the instance memories
(deep-and-shallow reliable-neighbour masks read from memory rows), multi-centre contrast (MCCL) on the sub-centres.

Default = what the official code trains (``hil``); ``hil_paper`` is the paper's equations. Every paper-vs-code
difference of the spec's §6/§9 is a key of :class:`HIL.Params`. The run may start with ``warm_start_epochs`` epochs of
a DCL-like stage (the paper starts from a 30-epoch SDCL checkpoint; ``model.pretrained`` loads one instead).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..memory._function import MemoryLogits
from ..memory.cluster import multi_centre_contrast, nearest_centre_update
from ..modality import INFRARED, MODALITIES, VISIBLE
from ..models.agw import GeM
from ..ops import memory_contrastive, memory_update
from ..schema import spec
from .base import Method, register_method
from .clustering import count_clusters, jaccard_dbscan
from .hil_kmeans import batched_kmeans

__all__ = ["HIL", "HILPaper", "ShallowHead", "brst", "mccl_inverse_distance", "mccl_softmax", "neighbour_loss",
           "pooled_means", "reliable_neighbours", "sub_centres"]

#: Rows of the BRST similarity computed at once (bounds the N_q x M block).
BRST_CHUNK = 4096


# ------------------------------------------------------------------------------------------------ per epoch
def pooled_means(features: torch.Tensor, labels: torch.Tensor, num: int) -> torch.Tensor:
    """(num, D) float32 L2-normalised mean of the raw rows of each label 0..num-1 (-1 excluded; a label without
    members gives a zero row). features (N, D) float, labels (N,) int64."""
    keep = labels >= 0
    sums = torch.zeros(num, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels[keep].to(features.device), features[keep].double())
    counts = torch.bincount(labels[keep], minlength=num).clamp(min=1).to(sums)
    return F.normalize(sums / counts[:, None], dim=1).float().contiguous()


def sub_centres(features: torch.Tensor, labels: torch.Tensor, num_clusters: int, k: int, *, mix: float = 0.9,
                include_mean: bool = True, kmeans_features: torch.Tensor | None = None, n_init: int = 10,
                seed: int = 0) -> torch.Tensor:
    """HIL's SubCentres (spec §1): (C, P, D) float32, every row L2-normalised, P = k + 1 with the mean row, else k.

    features: (N, D) raw features; labels: (N,) int64 in [-1, C). For cluster c with members F_c: mu_c = mean(F_c);
    if n_c > k, K-means (scikit-learn semantics, :func:`batched_kmeans` on ``kmeans_features``, default
    ``features``) gives sub-means nu_{c,j} (K-means label order) and s_{c,j} = mix mu_c + (1 - mix) nu_{c,j};
    otherwise (n_c <= k, or fewer than k distinct K-means labels) s_{c,j} = mu_c. Rows: [mu_c, s_{c,0..k-1}].
    """
    dim = features.shape[1]
    labels = labels.to(features.device)
    mean = torch.zeros(num_clusters, dim, dtype=torch.float64, device=features.device)
    keep = labels >= 0
    mean.index_add_(0, labels[keep], features[keep].double())
    mean /= torch.bincount(labels[keep], minlength=num_clusters).clamp(min=1).to(mean)[:, None]
    sub = batched_kmeans(features if kmeans_features is None else kmeans_features, labels.cpu(), num_clusters, k,
                         n_init=n_init, seed=seed).to(features.device)
    done = sub >= 0
    slot = labels[done] * k + sub[done]
    sums = torch.zeros(num_clusters * k, dim, dtype=torch.float64, device=features.device)
    sums.index_add_(0, slot, features[done].double())
    counts = torch.bincount(slot, minlength=num_clusters * k).to(sums)
    nu = (sums / counts.clamp(min=1)[:, None]).view(num_clusters, k, dim)
    has = (counts.view(num_clusters, k) > 0).all(1)                        # K-means ran and used all k labels
    sub_rows = torch.where(has[:, None, None], mix * mean[:, None, :] + (1.0 - mix) * nu, mean[:, None, :])
    rows = torch.cat([mean[:, None, :], sub_rows], dim=1) if include_mean else sub_rows
    return F.normalize(rows, dim=2).float().contiguous()


@torch.no_grad()
def brst(query: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor, gamma: float,
         compare: str = "ge") -> torch.Tensor:
    """Bidirectional reverse selective transfer (Eq. 26-27, spec §4): (N_q,) int64 labels in [-1, M).

    query: (N_q, D) raw features of the modality being relabelled (outliers included: they raise the column maxima);
    query_labels: (N_q,) its own clustering, -1 = outlier (stays -1); prototypes: (M, D) raw means of the other
    modality's clusters. S = cos(query, prototypes); row k keeps i* = argmax_i S_ki (first on ties) when
    S_ki* >= gamma max_k' S_k'i* (``compare="gt"``: >), else -1. Computed in row blocks: O(N_q + M) extra space.
    """
    if compare not in ("ge", "gt"):
        raise ValueError(f"compare must be 'ge' or 'gt', got {compare!r}")
    num = prototypes.shape[0]
    out = torch.full((query.shape[0],), -1, dtype=torch.int64)
    if num == 0 or query.shape[0] == 0:
        return out
    proto = F.normalize(prototypes.float(), dim=1)
    col_max = torch.full((num,), -float("inf"), device=proto.device)
    row_max, row_arg = [], []
    for start in range(0, query.shape[0], BRST_CHUNK):
        sims = F.normalize(query[start: start + BRST_CHUNK].float().to(proto.device), dim=1) @ proto.T
        col_max = torch.maximum(col_max, sims.max(0).values)
        best = sims.max(1)
        row_max.append(best.values)
        row_arg.append(best.indices)
    row_max, row_arg = torch.cat(row_max), torch.cat(row_arg)
    bound = gamma * col_max[row_arg]
    keep = (row_max >= bound) if compare == "ge" else (row_max > bound)
    keep &= query_labels.to(keep.device) >= 0
    out[keep.cpu()] = row_arg[keep].cpu()
    return out


# ------------------------------------------------------------------------------------------------ loss terms
def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (1/d and the 1e-8 clamp are not bf16-safe); float64 stays float64 (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()

def mccl_inverse_distance(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's MCCL (spec §2, no temperature) from cosines ``cos`` (B, C, P) of unit queries with unit centres.

    d = sqrt(max(2 - 2 cos, 1e-12)); s_b = argmin_c min_p d (first on ties); A+ = mean_p 1/d[s_b, p];
    A- = mean_{c != s_b} 1/min_p d[c] (0 when C = 1); loss_b = -log(A+ / (A+ + A- + 1e-8)).
    Returns (per-row loss (B,), s (B,) int64).
    """
    d = (2.0 - 2.0 * _f32(cos)).clamp_min(1e-12).sqrt()
    nearest = d.min(2).values                                               # (B, C)
    s = nearest.detach().argmin(1)
    rows = torch.arange(cos.shape[0], device=cos.device)
    pos = (1.0 / d[rows, s]).mean(1)
    inv = (1.0 / nearest).masked_fill(F.one_hot(s, cos.shape[1]).bool(), 0.0)
    neg = inv.sum(1) / max(cos.shape[1] - 1, 1)
    return -torch.log(pos / (pos + neg + 1e-8)), s


def mccl_softmax(cos: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's MCCL (Eq. 19-23) from cosines (B, C, P): s = cluster of the most similar centre; S_p = sum_p
    exp(cos[s, p] / τ), S_n = sum_{c != s} exp(max_p cos[c, p] / τ); loss_b = -log(S_p / (S_p + S_n)).
    Returns (per-row loss (B,), s (B,)) (:func:`vireid_fast.memory.cluster.multi_centre_contrast`)."""
    return multi_centre_contrast(_f32(cos) / temp)


@torch.no_grad()
def reliable_neighbours(own_deep: torch.Tensor, own_shallow: torch.Tensor | None, target_deep: torch.Tensor,
                        target_shallow: torch.Tensor | None, beta: float) -> torch.Tensor:
    """(B, N_t) bool R: sigma_bj > beta max_j' sigma_bj' for the deep memory rows and (when given) the shallow ones
    (strict >). own_*: (B, D) the queries' own instance-memory rows; target_*: (N_t, D) the target memory."""
    sims = own_deep @ target_deep.T
    mask = sims > beta * sims.max(1, keepdim=True).values
    if own_shallow is not None:
        sims = own_shallow @ target_shallow.T
        mask &= sims > beta * sims.max(1, keepdim=True).values
    return mask


def neighbour_loss(query: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, temp: float,
                   form: str = "meanlog") -> torch.Tensor:
    """Neighbour contrast of one branch, batch mean (): p_bj = softmax_j(q̂_b . target_j / τ) clamped at 1e-8;
    ``meanlog`` (code): -(1/(|R_b| + 1)) sum_{j in R_b} log p_bj; ``logsum`` (paper Eq. 16): -log sum_{j in R_b} p_bj.
    An empty R_b gives 0. query (B, D) un-normalised; target (N_t, D) unit rows (no gradient); mask (B, N_t)."""
    query = _f32(query)
    log_p = F.log_softmax(F.normalize(query, dim=1) @ target.to(query.dtype).T / temp, dim=1)
    log_p = log_p.clamp_min(math.log(1e-8))
    size = mask.sum(1)
    if form == "meanlog":
        per_row = -(log_p * mask).sum(1) / (size + 1)
    elif form == "logsum":
        per_row = -torch.logsumexp(log_p.masked_fill(~mask, -float("inf")), dim=1)
        per_row = torch.where(size > 0, per_row, torch.zeros_like(per_row))
    else:
        raise ValueError(f"form must be 'meanlog' or 'logsum', got {form!r}")
    return per_row.mean()


# ------------------------------------------------------------------------------------------------ shallow head
class ShallowHead(nn.Module):
    """The shallow embedding g of a two-stream ResNet (spec §5, toolkit design; neither source has one for a CNN).

    ``stage4_copy``: g = BN(GeM_3(L4'(A(x2)))), x2 = the stage-2 map, A = 1x1 conv stride 2 to the stage-3 width +
    BN + ReLU, L4' = a copy of the encoder's stage 4 (its weights at construction, i.e. the pretrained ones);
    ``pool_proj_stage3``: g = BN(Linear(GeM_3(stage-3 map))). Both BNs have a frozen zero bias (BNNeck); width D =
    the encoder's ``feature_dim``. forward(maps: dict with "stage2" or "stage3") -> (B, D) raw g.
    """

    def __init__(self, encoder: nn.Module, mode: str = "stage4_copy"):
        super().__init__()
        if mode not in ("stage4_copy", "pool_proj_stage3"):
            raise ValueError(f"shallow_head must be 'stage4_copy' or 'pool_proj_stage3', got {mode!r}")
        self.mode = mode
        self.source = "stage2" if mode == "stage4_copy" else "stage3"
        was = encoder.training
        with torch.no_grad():
            probe = encoder.eval()(torch.zeros(1, 3, 64, 32, device=next(encoder.parameters()).device), 0,
                                   outputs=("stage2", "stage3"))
        encoder.train(was)
        c2, c3 = probe["stage2"].shape[1], probe["stage3"].shape[1]
        dim = encoder.feature_dim
        self.pool = GeM(3.0)
        if mode == "stage4_copy":
            self.adapter = nn.Sequential(nn.Conv2d(c2, c3, 1, stride=2, bias=False), nn.BatchNorm2d(c3),
                                         nn.ReLU(inplace=True))
            self.layer4 = copy.deepcopy(encoder.layer4)
            self.non_local4 = copy.deepcopy(encoder.non_local4)
            self.non_local_after = list(encoder.non_local_after[3])
        else:
            self.proj = nn.Linear(c3, dim)
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        x = maps[self.source]
        if self.mode == "pool_proj_stage3":
            return self.bnneck(self.proj(self.pool(x)))
        x = self.adapter(x)
        for index, block in enumerate(self.layer4):
            x = block(x)
            if index in self.non_local_after:
                x = self.non_local4[self.non_local_after.index(index)](x)
        return self.bnneck(self.pool(x))


# ------------------------------------------------------------------------------------------------ the method
@register_method("hil")
class HIL(Method):
    """Config keys: see ``Params`` (help strings), the spec's §6 table and docs/methods.md."""

    @dataclass
    class Params:
        name: str = spec("hil", help="the registered method name")
        temp: float = spec(0.05, min=0.0, min_exclusive=True, help="tau of the identity, neighbour and softmax MCCL")
        warm_start_epochs: int = spec(0, min=0, help="DCL-like epochs before HIL (per-modality identity contrast "
                                                     "on both branches, no BRST/MCCL/neighbours)")
        shallow: bool = spec(True, help="shallow branch g (off: every shallow term dropped, clustering on f only)")
        shallow_head: str = spec("stage4_copy", choices=("stage4_copy", "pool_proj_stage3"),
                                 help="how g is built from the encoder (toolkit design)")
        shallow_weight_id: float = spec(1.0, min=0.0, help="weight of g in L_id")
        shallow_weight_nb: float = spec(0.5, min=0.0, help="weight of g in L_nb")
        shallow_weight_mccl: float = spec(0.5, min=0.0, help="weight of g in L_mccl")
        rgb_two_views: bool = spec(True, help="second visible view with ChannelExchange (Q18)")
        cluster_momentum: float = spec(0.1, min=0.0, max=0.999, help="keep-ratio of the cluster memory update")
        memory_layout: str = spec("shared", choices=("shared", "per_modality"),
                                  help="identity memory and sub-centres under BRST: one shared set per branch "
                                       "(code, Q3/Q8) or one per modality over the unified clusters (Eq. 5-6, 24)")
        brst: bool = spec(True, help="ablation: BRST association (off: two label spaces, per-modality memories)")
        brst_gamma: float = spec(0.5, min=0.0, max=1.0, min_exclusive=True, help="reverse-selection ratio gamma")
        brst_direction: str = spec("v2r", choices=("v2r", "r2v", "alternate"), help="Q1")
        brst_compare: str = spec("ge", choices=("ge", "gt"), help="Q2: m_r >= gamma m_c (code) or > (paper)")
        neighbor: bool = spec(True, help="ablation: neighbour contrast L_nb")
        neighbor_beta: float = spec(0.9, min=0.0, max=1.0, min_exclusive=True, help="reliable-neighbour ratio")
        neighbor_form: str = spec("meanlog", choices=("meanlog", "logsum"), help="Q11")
        neighbor_cross: str = spec("parity", choices=("parity", "all"),
                                   help="Q12: v->r on even, r->v on odd HIL epochs (code) or both every epoch")
        neighbor_v2r_scale: float = spec(0.1, min=0.0, help="extra factor on N^vr (code 0.1)")
        instance_momentum: float = spec(0.9, min=0.0, max=0.999, help="keep-ratio of the instance-memory update")
        instance_update_input: str = spec("raw", choices=("raw", "normalized"), help="Q17")
        lambda1: float = spec(0.1, min=0.0, help="L_nb weight")
        mccl: bool = spec(True, help="ablation: multi-centre contrast L_mccl")
        mccl_form: str = spec("inverse_distance", choices=("inverse_distance", "softmax"), help="Q4")
        mccl_cross_duplicate: bool = spec(True, help="Q8: on one shared U the cross terms repeat the intra ones")
        mccl_valid_mask: bool = spec(True, help="Q9: only rows whose deep and shallow nearest clusters agree")
        mccl_empty: str = spec("zero", choices=("zero", "nan"), help="MCCL over an empty valid set")
        lambda2: float = spec(0.1, min=0.0, help="L_mccl weight before lambda2_switch_epoch")
        lambda2_late: float = spec(1.0, min=0.0, help="L_mccl weight from lambda2_switch_epoch (Q10)")
        lambda2_switch_epoch: int = spec(20, min=0, help="HIL epoch (0-based) where lambda2_late starts")
        num_subcentres: int = spec(9, min=1, help="K sub-clusters per coarse cluster")
        subcentre_mix: float = spec(0.9, min=0.0, max=1.0, help="w: weight of the mean in a sub-centre (Q6)")
        include_mean_row: bool = spec(True, help="row 0 = the mean in U and in A+ (Q5)")
        subcentre_update: str = spec("none", choices=("none", "nearest"), help="Q7")
        kmeans_seed: int = spec(0, help="K-means random_state")
        kmeans_n_init: int = spec(10, min=1, help="K-means n_init")
        kmeans_on: str = spec("raw", choices=("raw", "normalized"), help="K-means feature space")
        test_feature: str = spec("per_part", choices=("per_part", "joint"),
                                 help="evaluation: [f̂ ; ĝ] (SYSU script) or normalize([f ; g]) (RegDB script)")

    def __init__(self, params, context):
        super().__init__(params, context)
        p = params
        self.shallow_head = ShallowHead(context.encoder, p.shallow_head) if p.shallow else None
        self.epoch, self.hil_epoch, self.warm = 0, 0, p.warm_start_epochs > 0
        for name in ("id_deep", "id_shallow", "id_deep_visible", "id_deep_infrared", "id_shallow_visible",
                     "id_shallow_infrared", "centres_deep", "centres_shallow", "centres_deep_visible",
                     "centres_deep_infrared", "centres_shallow_visible", "centres_shallow_infrared",
                     "instance_deep_visible", "instance_deep_infrared", "instance_shallow_visible",
                     "instance_shallow_infrared"):
            self.register_buffer(name, None)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._info: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- switches
    @property
    def brst_on(self) -> bool:
        return bool(self.params.brst) and not self.warm

    @property
    def shared_label_space(self) -> bool:  # read by the engine each epoch
        return self.brst_on

    @property
    def mccl_on(self) -> bool:
        return bool(self.params.mccl) and not self.warm

    @property
    def neighbor_on(self) -> bool:
        return bool(self.params.neighbor) and self.params.lambda1 > 0 and not self.warm

    @property
    def per_modality(self) -> bool:
        """Per-modality identity memories and sub-centres (BRST off, or ``memory_layout: per_modality``)."""
        return not self.brst_on or self.params.memory_layout == "per_modality"

    @property
    def lambda2_now(self) -> float:
        p = self.params
        return p.lambda2 if self.hil_epoch < p.lambda2_switch_epoch else p.lambda2_late

    @property
    def branches(self) -> tuple[str, ...]:
        return ("deep", "shallow") if self.params.shallow else ("deep",)

    def branch_weight(self, branch: str, term: str) -> float:
        return 1.0 if branch == "deep" else getattr(self.params, f"shallow_weight_{term}")

    def relabelled(self) -> str | None:
        """The modality BRST relabels this epoch (None: no BRST)."""
        if not self.brst_on:
            return None
        direction = self.params.brst_direction
        if direction == "alternate":
            return VISIBLE if self.hil_epoch % 2 == 0 else INFRARED
        return VISIBLE if direction == "v2r" else INFRARED

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.hil_epoch = epoch - self.params.warm_start_epochs
        self.warm = self.hil_epoch < 0
        self._info = {"hil/warm": float(self.warm), "hil/lambda2": float(self.lambda2_now)}

    # ----------------------------------------------------------------------------------------------- embeddings
    def encode(self, model, images, modality) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(f, g) raw (B, D) embeddings (g None with ``shallow: off``); the head follows ``model``'s train/eval mode."""
        if self.shallow_head is None:
            return model(images, modality), None
        out = model(images, modality, outputs=(self.shallow_head.source, "feature"))
        was = self.shallow_head.training
        self.shallow_head.train(model.training)
        g = self.shallow_head(out)
        self.shallow_head.train(was)
        return out["feature"], g

    def embed(self, model, images, modality):
        f, g = self.encode(model, images, modality)
        # half per view: the engine's flip sum is then the mean of the two views (raw, spec §1 step 1)
        out = {"f": 0.5 * f.float(), "feature": f.float() if g is None else torch.cat([f.float(), g.float()], 1)}
        if g is not None:
            out["g"] = 0.5 * g.float()
        return out

    def finish_embeddings(self, embeddings):
        feature = embeddings["feature"]
        if self.shallow_head is not None and self.params.test_feature == "per_part":
            dim = feature.shape[1] // 2
            feature = torch.cat([F.normalize(feature[:, :dim], dim=1), F.normalize(feature[:, dim:], dim=1)], 1)
        else:
            feature = F.normalize(feature, dim=1)
        return {**embeddings, "feature": feature}

    def joint(self, features, modality) -> torch.Tensor:
        """Raw [f ; g] (or f) of one modality's training images."""
        parts = features[modality]
        return parts["f"] if "g" not in parts or not self.params.shallow else torch.cat([parts["f"], parts["g"]], 1)

    # ----------------------------------------------------------------------------------------------- per epoch
    def pseudo_label(self, features):
        c = self.ctx.config.cluster
        with self.ctx.timed("cluster"):
            labels = {m: jaccard_dbscan(F.normalize(self.joint(features, m).float(), dim=1), k1=c.k1, k2=c.k2,
                                        eps=c.eps, min_samples=c.min_samples) for m in MODALITIES}
        with self.ctx.timed("associate"):
            return self.associate(features, labels)

    def associate(self, features, labels):
        query = self.relabelled()
        if query is None:
            return labels
        other = INFRARED if query == VISIBLE else VISIBLE
        num = count_clusters(labels[other])
        proto = torch.zeros(num, self.joint(features, other).shape[1], dtype=torch.float64)
        keep = labels[other] >= 0
        proto.index_add_(0, labels[other][keep], self.joint(features, other)[keep].double())
        proto /= torch.bincount(labels[other][keep], minlength=num).clamp(min=1).to(proto)[:, None]
        new = brst(self.joint(features, query), labels[query], proto, self.params.brst_gamma,
                   self.params.brst_compare)
        before = int((labels[query] >= 0).sum())
        self._info.update({"brst/kept": float((new >= 0).sum()), "brst/dropped": float(before - (new >= 0).sum()),
                           "brst/clusters": float(num)})
        return {query: new, other: labels[other]}

    def build_memories(self, features, labels):
        device = self.ctx.device
        for m in MODALITIES:
            for b in self.branches:
                feats = features[m]["f" if b == "deep" else "g"]
                setattr(self, f"instance_{b}_{m}", F.normalize(feats.float(), dim=1).to(device).contiguous())
        unified = None
        if self.brst_on:
            unified = count_clusters(labels[INFRARED if self.relabelled() == VISIBLE else VISIBLE])
            self._info["hil/clusters"] = float(unified)
        for b in self.branches:
            key = "f" if b == "deep" else "g"
            if not self.per_modality:
                pooled = torch.cat([features[VISIBLE][key], features[INFRARED][key]])
                pooled_labels = torch.cat([labels[VISIBLE], labels[INFRARED]])
                setattr(self, f"id_{b}", pooled_means(pooled, pooled_labels, unified).to(device))
                if self.mccl_on:
                    setattr(self, f"centres_{b}", self._centres(pooled, pooled_labels, unified).to(device))
                continue
            for m in MODALITIES:
                num = unified if unified is not None else count_clusters(labels[m])
                setattr(self, f"id_{b}_{m}", pooled_means(features[m][key], labels[m], num).to(device))
                if self.mccl_on:
                    setattr(self, f"centres_{b}_{m}", self._centres(features[m][key], labels[m], num).to(device))

    def _centres(self, feats, labels, num):
        """SubCentres of one buffer; its wall time is added to the epoch's ``hil/subcentres_s`` (inside the engine's
        ``time/memory``)."""
        p = self.params
        start = time.perf_counter()
        kfeats = feats if p.kmeans_on == "raw" else F.normalize(feats.float(), dim=1)
        out = sub_centres(feats, labels, num, p.num_subcentres, mix=p.subcentre_mix, include_mean=p.include_mean_row,
                          kmeans_features=kfeats, n_init=p.kmeans_n_init, seed=p.kmeans_seed)
        self._info["hil/subcentres_s"] = self._info.get("hil/subcentres_s", 0.0) + time.perf_counter() - start
        return out

    def end_epoch(self, epoch):
        del epoch
        return dict(self._info)

    # ----------------------------------------------------------------------------------------------- per iteration
    def encode_batch(self, batch):
        """Per modality (f, g or None, labels, dataset indices) of the step's rows; visible rows = view 1 then the
        ChannelExchange view (both with the image's label and index) when ``rgb_two_views``."""
        ctx = self.ctx
        views = [ctx.augment["train"](batch.visible_images)]
        if self.params.rgb_two_views:
            views.append(ctx.augment["channel"](batch.visible_images))
        x_ir = ctx.augment["train"](batch.infrared_images)
        nv = sum(v.shape[0] for v in views)
        images = torch.cat([*views, x_ir])
        modality = torch.cat([torch.zeros(nv, dtype=torch.long), torch.ones(x_ir.shape[0], dtype=torch.long)])
        with ctx.autocast():
            f, g = self.encode(ctx.model, images, modality.to(images.device))
        reps = len(views)
        out = {}
        for m, rows, labels, idx in ((VISIBLE, slice(0, nv), batch.visible_labels, batch.visible_indices),
                                     (INFRARED, slice(nv, None), batch.infrared_labels, batch.infrared_indices)):
            r = reps if m == VISIBLE else 1
            out[m] = (ctx.gather(f[rows].float()), None if g is None else ctx.gather(g[rows].float()),
                      ctx.gather(labels).repeat(r), ctx.gather(idx.to(f.device)).repeat(r))
        return out

    def training_step(self, batch):
        rows = self.encode_batch(batch)
        losses = {}
        for b in self.branches:
            weight = self.branch_weight(b, "id")
            if weight > 0:
                losses[f"id_{b}"] = weight * self.identity_loss(rows, b)
        if self.neighbor_on:
            losses["neighbor"] = self.params.lambda1 * self.neighbor_total(rows)
        if self.mccl_on and self.lambda2_now > 0:
            losses["mccl"] = self.lambda2_now * self.mccl_total(rows)
        self._queue_instance_updates(rows)
        return losses

    def identity_loss(self, rows, branch) -> torch.Tensor:
        """ℓ_id(v) + ℓ_id(r) of one branch. Shared memory: both gradients from the memory before this step, then the
        visible rows' sequential updates, then the infrared rows' (spec §3 toolkit order)."""
        p = self.params
        k = 0 if branch == "deep" else 1
        if not self.per_modality:
            memory = getattr(self, f"id_{branch}")
            x = torch.cat([rows[VISIBLE][k], rows[INFRARED][k]])
            y = torch.cat([rows[VISIBLE][2], rows[INFRARED][2]])
            x = F.normalize(x.float(), dim=1)
            update = partial(memory_update, targets=y, memory=memory, momentum=p.cluster_momentum,
                             update="sequential", normalized=True)
            logits = MemoryLogits.apply(x, memory, update) / p.temp
            nv = rows[VISIBLE][0].shape[0]
            return F.cross_entropy(logits[:nv], y[:nv]) + F.cross_entropy(logits[nv:], y[nv:])
        return sum(memory_contrastive(rows[m][k], rows[m][2], getattr(self, f"id_{branch}_{m}"), temp=p.temp,
                                      momentum=p.cluster_momentum, update="sequential") for m in MODALITIES)

    def neighbor_term(self, rows, query, target) -> torch.Tensor:
        """N^{at}: deep + shallow_weight_nb x shallow neighbour contrast of modality ``query``'s rows against
        modality ``target``'s instance memories (masks from the queries' own memory rows)."""
        p = self.params
        idx = rows[query][3]
        own = [getattr(self, f"instance_{b}_{query}")[idx] for b in self.branches]
        tgt = [getattr(self, f"instance_{b}_{target}") for b in self.branches]
        mask = reliable_neighbours(own[0], own[1] if len(own) > 1 else None, tgt[0], tgt[1] if len(tgt) > 1 else None,
                                   p.neighbor_beta)
        total = 0.0
        for k, b in enumerate(self.branches):
            weight = self.branch_weight(b, "nb")
            if weight > 0:
                total = total + weight * neighbour_loss(rows[query][k], tgt[k], mask, p.temp, p.neighbor_form)
        return total

    def neighbor_total(self, rows) -> torch.Tensor:
        """L_nb(e) = N^vv + N^rr + [cross v->r] scale N^vr + [cross r->v] N^rv (spec §2 schedule)."""
        p = self.params
        total = self.neighbor_term(rows, VISIBLE, VISIBLE) + self.neighbor_term(rows, INFRARED, INFRARED)
        even = self.hil_epoch % 2 == 0
        if (p.neighbor_cross == "all" or even) and p.neighbor_v2r_scale > 0:
            total = total + p.neighbor_v2r_scale * self.neighbor_term(rows, VISIBLE, INFRARED)
        if p.neighbor_cross == "all" or not even:
            total = total + self.neighbor_term(rows, INFRARED, VISIBLE)
        return total

    def _centre_cosines(self, x, centres, targets) -> torch.Tensor:
        """(B, C, P) cosines of unit x with the buffer centres (C, P, D); with ``subcentre_update: nearest`` and
        ``targets`` given, the buffer is updated in backward (after this call's gradient)."""
        num, per, dim = centres.shape
        flat = centres.view(num * per, dim)
        update = None
        if self.params.subcentre_update == "nearest" and targets is not None:
            update = partial(nearest_centre_update, features=centres, targets=targets,
                             momentum=self.params.cluster_momentum)
        return MemoryLogits.apply(x, flat, update).view(-1, num, per)

    def _mc(self, cos_by_branch) -> torch.Tensor:
        """MC(a): mean over valid rows of the deep loss + shallow_weight_mccl x the shallow loss."""
        p = self.params
        per = {}
        for b, cos in cos_by_branch.items():
            per[b] = mccl_inverse_distance(cos) if p.mccl_form == "inverse_distance" else mccl_softmax(cos, p.temp)
        valid = torch.ones_like(per["deep"][1], dtype=torch.bool)
        if p.mccl_valid_mask and "shallow" in per:
            valid = per["deep"][1] == per["shallow"][1]
        count = int(valid.sum())
        total = 0.0
        for b, (loss, _) in per.items():
            weight = self.branch_weight(b, "mccl")
            if weight == 0:
                continue
            if count == 0:
                value = loss.sum() * (float("nan") if p.mccl_empty == "nan" else 0.0)
            else:
                value = (loss * valid).sum() / count
            total = total + weight * value
        return total

    def mccl_total(self, rows) -> torch.Tensor:
        """Shared U: (2 if mccl_cross_duplicate else 1) x (MC(v) + MC(r)); per-modality U (BRST off or
        ``memory_layout: per_modality``): MC(v; U^v) + MC(r; U^r) + MC(v; U^r) + MC(r; U^v)."""
        p = self.params
        x = {m: [F.normalize(t.float(), dim=1) for t in rows[m][:2] if t is not None] for m in MODALITIES}
        if not self.per_modality:
            nv = rows[VISIBLE][0].shape[0]
            y = torch.cat([rows[VISIBLE][2], rows[INFRARED][2]])
            cos = {b: self._centre_cosines(torch.cat([x[VISIBLE][k], x[INFRARED][k]]), getattr(self, f"centres_{b}"),
                                           y) for k, b in enumerate(self.branches)}
            total = self._mc({b: c[:nv] for b, c in cos.items()}) + self._mc({b: c[nv:] for b, c in cos.items()})
            return (2.0 if p.mccl_cross_duplicate else 1.0) * total
        total = 0.0
        for m in MODALITIES:  # intra first (updates the own buffer), then cross (never updates)
            own = {b: self._centre_cosines(x[m][k], getattr(self, f"centres_{b}_{m}"), rows[m][2])
                   for k, b in enumerate(self.branches)}
            total = total + self._mc(own)
        for m in MODALITIES:
            other = INFRARED if m == VISIBLE else VISIBLE
            cross = {b: self._centre_cosines(x[m][k], getattr(self, f"centres_{b}_{other}"), None)
                     for k, b in enumerate(self.branches)}
            total = total + self._mc(cross)
        return total

    def _queue_instance_updates(self, rows) -> None:
        """The instance-memory rows of this step's images, applied in :meth:`after_step` (after the gradient, which
        thus reads the pre-update rows; the code updates before backward — spec §3)."""
        self._pending = []
        if not self.neighbor_on:
            return
        for m in MODALITIES:
            for k, b in enumerate(self.branches):
                self._pending.append((f"instance_{b}_{m}", rows[m][k].detach(), rows[m][3]))

    def after_step(self, iteration):
        del iteration
        p = self.params
        for name, q, idx in self._pending:
            memory_update(q.float(), idx.to(q.device), getattr(self, name), momentum=p.instance_momentum,
                          update="sequential", normalized=p.instance_update_input == "raw")
        self._pending = []


@register_method("hil_paper")
class HILPaper(HIL):
    """The paper's equations: per-modality identity memories, plain sub-means without the mean row updated every
    iteration, softmax MCCL over the other modality's sub-centres, log-sum neighbour loss on all four pairs,
    BRST alternating by epoch parity with a strict test, lambda2 = 0.1 throughout."""

    @dataclass
    class Params(HIL.Params):
        name: str = spec("hil_paper", help="the registered method name")
        memory_layout: str = spec("per_modality", choices=("shared", "per_modality"), help="see hil")
        brst_direction: str = spec("alternate", choices=("v2r", "r2v", "alternate"), help="see hil")
        brst_compare: str = spec("gt", choices=("ge", "gt"), help="see hil")
        neighbor_form: str = spec("logsum", choices=("meanlog", "logsum"), help="see hil")
        neighbor_cross: str = spec("all", choices=("parity", "all"), help="see hil")
        neighbor_v2r_scale: float = spec(1.0, min=0.0, help="see hil")
        mccl_form: str = spec("softmax", choices=("inverse_distance", "softmax"), help="see hil")
        mccl_cross_duplicate: bool = spec(False, help="see hil")
        mccl_valid_mask: bool = spec(False, help="see hil")
        lambda2_late: float = spec(0.1, min=0.0, help="see hil")
        subcentre_mix: float = spec(0.0, min=0.0, max=1.0, help="see hil")
        include_mean_row: bool = spec(False, help="see hil")
        subcentre_update: str = spec("nearest", choices=("none", "nearest"), help="see hil")
