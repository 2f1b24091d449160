"""SWPCL soft-weight prototypes (only the paper's abstract is public: every concrete choice is stated here)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.memory_contrastive import memory_update
from ._function import MemoryLogits, check_memory_inputs, momentum_step_

__all__ = ["SoftPrototypeMemory", "SoftWeightPrototypeMemory"]


class SoftWeightPrototypeMemory(nn.Module):
    """Soft prototypes with soft weights and a progressive schedule, after SWPCL's abstract.

    What the abstract states: the soft prototypes (SP) of a cluster are the nearest-neighbour samples of its centroid
    prototype; each gets a soft weight (SW) measuring its correlation with the centroid; they enter the contrastive
    loss through the weights; a progressive strategy shifts the focus to reliable soft prototypes.

    Choices made here (not from the paper, whose body is not public):

    * :meth:`build` (once per epoch): centroid ``μ_c = normalize(mean of the normalised member features)`` (labels < 0
      are outliers, clusters in sorted label order); the soft prototypes are the ``num_prototypes`` members with the
      largest cosine similarity to ``μ_c`` (all members if fewer), stored normalised; their raw weights are those
      similarities, clamped to at least 1e-6.
    * Weights: ``ŵ_ck = w_ck^γ / Σ_k' w_ck'^γ`` over the cluster's prototypes, with ``γ = 1 + (max_sharpness - 1) p``
      for the training progress ``p ∈ [0, 1]`` set by :meth:`set_progress` — γ = 1 gives weights proportional to the
      similarity, a larger γ concentrates them on the prototypes closest to the centroid.
    * Loss: ``-1/B Σ_b Σ_k ŵ_{y_b k} log softmax_{(c, k)}(x_b . p_ck / τ)`` — a weighted sum of InfoNCE terms whose
      softmax runs over every soft prototype of every cluster.
    * Update (backward): a prototype that is the memory entry of a sample in the batch (``indices`` given to forward
      are dataset indices) gets ``normalize(μ p + (1 - μ) x)``, in batch order; other prototypes stay until the next
      :meth:`build`.

    Buffers: ``prototypes`` (C, K, D), ``weights`` (C, K) raw similarities (0 = padding), ``prototype_index`` (C, K)
    dataset indices (-1 = padding), ``row_of_index`` (N,) flattened prototype row of each dataset index or -1.
    """

    def __init__(self, num_features: int, num_prototypes: int = 4, temp: float = 0.05, momentum: float = 0.2,
                 max_sharpness: float = 4.0):
        super().__init__()
        if num_prototypes < 1 or not temp > 0 or not 0.0 <= momentum < 1.0 or not max_sharpness >= 1.0:
            raise ValueError("need num_prototypes >= 1, temp > 0, momentum in [0, 1) and max_sharpness >= 1")
        self.num_features, self.num_prototypes = num_features, num_prototypes
        self.temp, self.momentum, self.max_sharpness = temp, momentum, max_sharpness
        self.sharpness = 1.0
        self.register_buffer("prototypes", torch.zeros(0, num_prototypes, num_features))
        self.register_buffer("weights", torch.zeros(0, num_prototypes))
        self.register_buffer("prototype_index", torch.zeros(0, num_prototypes, dtype=torch.int64))
        self.register_buffer("row_of_index", torch.zeros(0, dtype=torch.int64))

    def set_progress(self, progress: float) -> None:
        """Training progress p in [0, 1] (e.g. epoch / epochs): sets γ = 1 + (max_sharpness - 1) p."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        self.sharpness = 1.0 + (self.max_sharpness - 1.0) * progress

    @torch.no_grad()
    def build(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Select the soft prototypes of every cluster: features (N, D), labels (N,) int, -1 = outlier."""
        check_memory_inputs(features, labels, self.num_features, None, name="labels")
        labels = labels.to(features.device, torch.int64)
        normalized = F.normalize(features.float(), dim=1)
        clusters = torch.unique(labels[labels >= 0])
        if clusters.numel() == 0:
            raise ValueError("labels hold no cluster (all are outliers < 0)")
        count, k, dim = clusters.numel(), self.num_prototypes, self.num_features
        prototypes = torch.zeros(count, k, dim, device=features.device)
        weights = torch.zeros(count, k, device=features.device)
        index = torch.full((count, k), -1, dtype=torch.int64, device=features.device)
        for row, label in enumerate(clusters.tolist()):
            members = torch.nonzero(labels == label).flatten()
            centroid = F.normalize(normalized[members].mean(0), dim=0)
            sims = normalized[members] @ centroid
            top = torch.topk(sims, min(k, members.numel())).indices
            prototypes[row, : top.numel()] = normalized[members[top]]
            weights[row, : top.numel()] = sims[top].clamp_min(1e-6)
            index[row, : top.numel()] = members[top]
        row_of_index = torch.full((features.shape[0],), -1, dtype=torch.int64, device=features.device)
        valid = index >= 0
        row_of_index[index[valid]] = torch.nonzero(valid.flatten()).flatten()
        self.prototypes, self.weights = prototypes, weights
        self.prototype_index, self.row_of_index = index, row_of_index

    def soft_weights(self) -> torch.Tensor:
        """Normalised weights ŵ (C, K) at the current sharpness (0 on padding)."""
        powered = torch.where(self.weights > 0, self.weights.clamp_min(1e-6) ** self.sharpness, 0.0)
        return powered / powered.sum(1, keepdim=True)

    def _update(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        rows = self.row_of_index[indices]
        keep = rows >= 0
        if bool(keep.any()):
            flat = self.prototypes.view(-1, self.num_features)
            memory_update(x[keep], rows[keep], flat, momentum=self.momentum, update="sequential", normalized=True)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, D), targets (B,) cluster rows in [0, C), indices (B,) dataset indices or None -> loss ()."""
        clusters = self.prototypes.shape[0]
        if clusters == 0:
            raise ValueError("call build(features, labels) before forward")
        targets = check_memory_inputs(inputs, targets, self.num_features, clusters)
        update = None
        if indices is not None:
            indices = check_memory_inputs(inputs, indices, self.num_features, self.row_of_index.shape[0],
                                          name="indices")
            update = partial(self._update, indices=indices)
        x = F.normalize(inputs.to(self.prototypes.dtype), dim=1)
        flat = self.prototypes.view(-1, self.num_features)
        logits = MemoryLogits.apply(x, flat, update) / self.temp
        logits = logits.masked_fill(~(self.weights > 0).flatten()[None, :], float("-inf"))
        log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).view(-1, clusters, self.num_prototypes)
        batch = torch.arange(x.shape[0], device=x.device)
        own = log_prob[batch, targets]
        weights = self.soft_weights()[targets]
        return -torch.where(weights > 0, weights * own, 0.0).sum(1).mean()


class SoftPrototypeMemory(nn.Module):
    """SWPCL memory as ``shared/spec/methods/swpcl.md`` specifies it (vireid_fast interpretation of an abstract).

    Buffers (per modality): ``bank`` (C + C K, D) with views ``centroids`` (C, D) cm_c and ``soft`` (C, K, D) soft
    prototypes sp_{c,k}; ``mask`` (C, K)
    float 1 = valid slot; ``sims`` (C, K) s_{c,k} = cm_c . sp_{c,k}; ``weights`` (C, K) soft weights w (0 on invalid
    slots, each row sums to 1). All float32 (float64 if built from float64 features), no gradient.

    Loss of one call (:meth:`forward`), on normalised f_b and labels y_b:
    ``L_mix = (1 - lam) CE(f . cm^T / tau, y) + lam * l_SW`` with
    ``l_SW = 1/B sum_b sum_k w_{y,k} [log(exp a_{b,k} + sum_{c != y} exp g_{b,c}) - a_{b,k}]``,
    ``a_{b,k} = f_b . sp_{y,k} / tau``, ``g_{b,c} = f_b . cm_c / tau`` (swpcl.md §2.1-2.3). The logits use the bank as
    it is when the call's backward starts (updates of later calls run first, as every memory op here).

    Update in backward (``update="all"``, swpcl.md §3.3), per class c present: with p = cm_c before the update,
    ``cm_c <- n(alpha cm_c + (1 - alpha) mean(P_c))``; the class's batch features ranked by ``x . p`` (descending, batch
    order on ties) feed slots k < min(K, n_c): ``sp <- n(alpha sp + (1 - alpha) x_(k))`` if the slot is valid, else
    ``sp <- x_(k)`` and the slot becomes valid; then s and w of c are recomputed. ``update="centroid_only"`` updates
    cm only, ``"none"`` nothing; ``sp_update="static"`` keeps soft bank and weights as built.

    Weights (§3.1): ``softmax`` of s / ``sw_temp`` over valid slots, ``linear`` (w ~ max(s, 0), uniform if all 0),
    ``uniform``; ``min_sim`` (None = off) drops slots with s < min_sim except each cluster's most similar one.
    """

    def __init__(self, num_features: int, num_prototypes: int = 4, temp: float = 0.05, momentum: float = 0.1,
                 sw_temp: float = 0.1, sw_form: str = "softmax", min_sim: float | None = None,
                 sp_update: str = "momentum_topk"):
        super().__init__()
        if num_prototypes < 1 or not temp > 0 or not 0.0 <= momentum < 1.0 or not sw_temp > 0:
            raise ValueError(f"need num_prototypes >= 1, temp > 0, momentum in [0, 1), sw_temp > 0; got "
                             f"{num_prototypes}, {temp}, {momentum}, {sw_temp}")
        if sw_form not in ("softmax", "linear", "uniform"):
            raise ValueError(f"sw_form must be 'softmax', 'linear' or 'uniform', got {sw_form!r}")
        if sp_update not in ("momentum_topk", "static"):
            raise ValueError(f"sp_update must be 'momentum_topk' or 'static', got {sp_update!r}")
        self.num_features, self.num_prototypes = num_features, num_prototypes
        self.temp, self.momentum, self.sw_temp, self.sw_form = temp, momentum, sw_temp, sw_form
        self.min_sim, self.sp_update = min_sim, sp_update
        # one (C + C K, D) buffer: rows [0, C) centroids, then the soft prototypes of cluster c at C + c K + k, so the
        # logits of a call and its backward read one live tensor that earlier-running updates have written
        self.register_buffer("bank", torch.zeros(0, num_features))
        self.register_buffer("mask", torch.zeros(0, num_prototypes))
        self.register_buffer("sims", torch.zeros(0, num_prototypes))
        self.register_buffer("weights", torch.zeros(0, num_prototypes))

    @property
    def num_clusters(self) -> int:
        return self.bank.shape[0] // (1 + self.num_prototypes)

    @property
    def centroids(self) -> torch.Tensor:
        """(C, D) view of the bank's centroid rows."""
        return self.bank[: self.num_clusters]

    @property
    def soft(self) -> torch.Tensor:
        """(C, K, D) view of the bank's soft-prototype rows."""
        c = self.num_clusters
        return self.bank[c:].view(c, self.num_prototypes, -1)

    # ------------------------------------------------------------------------------------------------ weights
    def _weights(self, sims: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask > 0
        if self.min_sim is not None:
            best = torch.zeros_like(valid).scatter_(1, sims.masked_fill(~valid, -torch.inf).argmax(1, keepdim=True),
                                                    True)
            valid = valid & ((sims >= self.min_sim) | best)
        if self.sw_form == "softmax":
            raw = torch.softmax((sims / self.sw_temp).masked_fill(~valid, -torch.inf), dim=1)
        else:
            raw = sims.clamp(min=0) if self.sw_form == "linear" else torch.ones_like(sims)
            raw = raw * valid
            empty = raw.sum(1, keepdim=True) == 0
            raw = torch.where(empty, valid.to(raw.dtype), raw)
            raw = raw / raw.sum(1, keepdim=True)
        return torch.where(valid, raw, torch.zeros_like(raw))

    @staticmethod
    def _rank_within_groups(keys: torch.Tensor, groups: torch.Tensor, num_groups: int, descending: bool
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, rank): positions sorted by group, then key (ties by position), and each one's rank in its group."""
        order = torch.sort(-keys if descending else keys, stable=True).indices
        order = order[torch.sort(groups[order], stable=True).indices]
        sorted_groups = groups[order]
        starts = torch.searchsorted(sorted_groups, torch.arange(num_groups, device=groups.device))
        return order, torch.arange(order.numel(), device=groups.device) - starts[sorted_groups]

    @torch.no_grad()
    def build(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Centroids and top-K soft prototypes of clusters 0..C-1 from features (N, D) float and labels (N,) int64
        (-1 = outlier; every cluster needs a member). Candidates are the cluster's members, ranked by
        cm_c . n(f_j) (descending, lower index first on ties); features are normalised per row here."""
        check_memory_inputs(features, labels, self.num_features, None, name="labels")
        labels = labels.to(features.device, torch.int64)
        keep = torch.nonzero(labels >= 0).flatten()
        if keep.numel() == 0:
            raise ValueError("labels hold no cluster (all are outliers < 0); nothing to build")
        num = int(labels.max()) + 1
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        x, lab = features[keep].to(dtype), labels[keep]
        counts = torch.bincount(lab, minlength=num)
        if bool((counts == 0).any()):
            raise ValueError("labels: clusters must be numbered 0..C-1 without gaps (an empty cluster has no "
                             "soft prototype); relabel them densely")
        sums = torch.zeros(num, x.shape[1], dtype=dtype, device=x.device).index_add_(0, lab, x)
        centroids = F.normalize(sums / counts[:, None].to(dtype), dim=1)
        xn = F.normalize(x, dim=1)
        order, rank = self._rank_within_groups((xn * centroids[lab]).sum(1), lab, num, descending=True)
        take = rank < self.num_prototypes
        rows, slots = lab[order[take]], rank[take]
        soft = torch.zeros(num, self.num_prototypes, x.shape[1], dtype=dtype, device=x.device)
        mask = torch.zeros(num, self.num_prototypes, dtype=dtype, device=x.device)
        soft[rows, slots] = xn[order[take]]
        mask[rows, slots] = 1.0
        self.bank = torch.cat([centroids, soft.view(-1, x.shape[1])]).contiguous()
        self.mask = mask
        self.sims = torch.einsum("cd,ckd->ck", centroids, soft) * mask
        self.weights = self._weights(self.sims, mask)

    # ------------------------------------------------------------------------------------------------ update
    def _update(self, x: torch.Tensor, targets: torch.Tensor, mode: str) -> None:
        if mode == "none":
            return
        labels, inverse = torch.unique(targets, return_inverse=True)
        before = self.centroids[labels].clone()
        counts = torch.bincount(inverse, minlength=labels.numel()).to(x.dtype)
        means = torch.zeros(labels.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
        momentum_step_(self.centroids, labels, means / counts[:, None], self.momentum)
        soft = self.soft
        if mode == "all" and self.sp_update == "momentum_topk":
            order, rank = self._rank_within_groups((x * before[inverse]).sum(1), inverse, labels.numel(),
                                                   descending=True)
            take = rank < self.num_prototypes
            rows, slots, feats = labels[inverse[order[take]]], rank[take], x[order[take]]
            old, valid = soft[rows, slots], self.mask[rows, slots][:, None] > 0
            moved = F.normalize(self.momentum * old + (1.0 - self.momentum) * feats, dim=1)
            soft[rows, slots] = torch.where(valid, moved, feats).to(soft.dtype)
            self.mask[rows, slots] = 1.0
        self.sims[labels] = torch.einsum("cd,ckd->ck", self.centroids[labels], soft[labels]) * self.mask[labels]
        if self.sp_update == "momentum_topk":
            self.weights[labels] = self._weights(self.sims[labels], self.mask[labels])

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, lam: float = 1.0, update: str = "all"
                ) -> torch.Tensor:
        """inputs (B, D) float, targets (B,) int64 in [0, C), lam in [0, 1] -> L_mix (); update: "all" |
        "centroid_only" | "none" (what this call's backward writes)."""
        if update not in ("all", "centroid_only", "none"):
            raise ValueError(f"update must be 'all', 'centroid_only' or 'none', got {update!r}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        classes = self.num_clusters
        if classes == 0:
            raise ValueError("call build(features, labels) before forward")
        targets = check_memory_inputs(inputs, targets, self.num_features, classes)
        x = F.normalize(inputs.to(self.bank.dtype), dim=1)
        logits = MemoryLogits.apply(x, self.bank, partial(self._update, targets=targets, mode=update)) / self.temp
        g = logits[:, :classes]
        loss_c = F.cross_entropy(g, targets)
        if lam == 0.0:
            return loss_c
        batch = torch.arange(x.shape[0], device=x.device)
        a = logits[:, classes:].view(-1, classes, self.num_prototypes)[batch, targets]            # (B, K)
        negatives = g.masked_fill(F.one_hot(targets, classes).bool(), -1e9)
        log_z = torch.logaddexp(a, torch.logsumexp(negatives, dim=1, keepdim=True))
        w = self.weights[targets]
        loss_sw = torch.where(w > 0, w * (log_z - a), torch.zeros_like(a)).sum(1).mean()
        return (1.0 - lam) * loss_c + lam * loss_sw
