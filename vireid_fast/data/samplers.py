"""Batch samplers for contrastive ReID training.

:class:`IdentityBalancedSampler`: P (pseudo-)identities × K instances per batch within one modality, labels -1
(DBSCAN outliers) excluded, identities with fewer than K images drawn with replacement (so they still fill K slots).
:class:`CrossModalityPairSampler`: a visible and an infrared P×K batch over the *same* P labels (shared pseudo-labels
after cross-modality association, as SALCR/MULT train). :class:`CameraAwareSampler`: cluster-contrast's
camera-aware instance sampler (anchor plus members from other cameras), as PCLHD's official code trains. All are
``batch_sampler``\\ s for a DataLoader, seeded and reshuffled per epoch with :meth:`set_epoch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def _groups(labels) -> dict[int, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers (-1 = outlier), got dtype {labels.dtype}")
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if labels.size else []
    bounds = list(starts) + [labels.size]
    return {int(sorted_labels[s]): order[s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            if sorted_labels[s] >= 0}


def _check_pk(num_identities: int, num_instances: int) -> None:
    for name, value in (("num_identities", num_identities), ("num_instances", num_instances)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _draw(rng: np.random.Generator, members: np.ndarray, k: int) -> np.ndarray:
    return rng.choice(members, size=k, replace=members.size < k)


class IdentityBalancedSampler(torch.utils.data.Sampler):
    """Yields batches (lists of dataset indices) of ``num_identities`` labels × ``num_instances`` indices each.

    labels: (N,) int, -1 = outlier (never sampled). Each epoch visits the identities in a new random order, P at a
    time (the last incomplete group is dropped), or, with ``num_batches``, draws that many batches cycling through
    such orders. Indices of one identity are distinct unless it has fewer than K images.
    """

    def __init__(self, labels: Sequence[int], num_identities: int, num_instances: int, seed: int = 0,
                 num_batches: int | None = None):
        _check_pk(num_identities, num_instances)
        self.groups = _groups(labels)
        if len(self.groups) < num_identities:
            raise ValueError(f"only {len(self.groups)} identities with a label >= 0; a batch needs "
                             f"num_identities={num_identities} (lower it or check the labels)")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be positive or None, got {num_batches!r}")
        self.ids = np.array(sorted(self.groups), dtype=np.int64)
        self.P, self.K = int(num_identities), int(num_instances)
        self.seed = seed
        self.num_batches = num_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches if self.num_batches is not None else len(self.ids) // self.P

    def batch_labels(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """P labels per batch, len(self) batches."""
        emitted = 0
        while True:
            order = rng.permutation(self.ids)
            for start in range(0, len(order) - self.P + 1, self.P):
                if emitted == len(self):
                    return
                yield order[start:start + self.P]
                emitted += 1
            if self.num_batches is None:
                return

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for chosen in self.batch_labels(rng):
            yield [int(i) for label in chosen for i in _draw(rng, self.groups[int(label)], self.K)]


class CrossModalityPairSampler(torch.utils.data.Sampler):
    """Yields ``2·P·K`` indices per batch: P·K visible indices, then P·K infrared indices (+ ``infrared_offset``)
    with the same label at the same position, over labels present in both modalities.

    Use with ``ConcatDataset([visible, infrared])`` (offset defaults to ``len(visible_labels)``), or call
    :meth:`pairs` for ``(visible_indices, infrared_indices)`` tuples.
    """

    def __init__(self, visible_labels: Sequence[int], infrared_labels: Sequence[int], num_identities: int,
                 num_instances: int, seed: int = 0, num_batches: int | None = None,
                 infrared_offset: int | None = None):
        _check_pk(num_identities, num_instances)
        visible, infrared = _groups(visible_labels), _groups(infrared_labels)
        shared = sorted(set(visible) & set(infrared))
        if len(shared) < num_identities:
            raise ValueError(f"only {len(shared)} labels >= 0 occur in both modalities ({len(visible)} visible, "
                             f"{len(infrared)} infrared); a batch needs num_identities={num_identities}")
        self.visible = {k: visible[k] for k in shared}
        self.infrared = {k: infrared[k] for k in shared}
        self.labels_sampler = IdentityBalancedSampler(np.array(shared), num_identities, 1, seed, num_batches)
        self.K = int(num_instances)
        self.seed = seed
        self.infrared_offset = len(np.asarray(visible_labels)) if infrared_offset is None else int(infrared_offset)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels_sampler)

    def pairs(self) -> Iterator[tuple[list[int], list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        for chosen in self.labels_sampler.batch_labels(rng):
            vis, ir = [], []
            for label in chosen:
                vis += [int(i) for i in _draw(rng, self.visible[int(label)], self.K)]
                ir += [int(i) for i in _draw(rng, self.infrared[int(label)], self.K)]
            yield vis, ir

    def __iter__(self) -> Iterator[list[int]]:
        for vis, ir in self.pairs():
            yield vis + [i + self.infrared_offset for i in ir]


class CameraAwareSampler(torch.utils.data.Sampler):
    """cluster-contrast's ``RandomMultipleGallerySampler`` as a batch sampler: each pass visits the labels in a new
    random order; per label one random anchor, then ``num_instances - 1`` members drawn only from cameras other than
    the anchor's when the label has any (else from its other members; a label with a single image contributes it
    alone), without replacement when there are at least ``num_instances`` candidates, with replacement otherwise. The
    pass's flat list is cut into batches of ``batch_size`` (labels may straddle two batches; the incomplete tail is
    dropped, as the community's ``drop_last`` loader) and passes repeat until ``num_batches`` batches were yielded
    (passes shorter than one batch are joined instead, where the community loader would yield nothing).

    labels, cameras: (N,) int (label -1 = outlier, never sampled; cameras any integer ids).
    """

    def __init__(self, labels: Sequence[int], cameras: Sequence[int], batch_size: int, num_instances: int,
                 seed: int = 0, num_batches: int = 1):
        _check_pk(batch_size, num_instances)
        self.groups = _groups(labels)
        self.cameras = np.asarray(cameras)
        if self.cameras.shape != np.asarray(labels).shape:
            raise ValueError(f"cameras must have the labels' shape {np.asarray(labels).shape}, got "
                             f"{self.cameras.shape}")
        if not self.groups:
            raise ValueError("no label >= 0 to sample (all outliers); raise cluster.eps or lower cluster.min_samples")
        if not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        self.ids = np.array(sorted(self.groups), dtype=np.int64)
        self.batch_size, self.K = int(batch_size), int(num_instances)
        self.seed, self.num_batches, self.epoch = seed, int(num_batches), 0
        # A pass always has the same length: 1 index for a single-image label, K for the others.
        self.pass_length = sum(1 if g.size == 1 else self.K for g in self.groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def one_pass(self, rng: np.random.Generator) -> list[int]:
        """The flat index list of one pass over the labels."""
        flat: list[int] = []
        for label in rng.permutation(self.ids):
            members = self.groups[int(label)]
            anchor = int(members[rng.integers(members.size)])
            flat.append(anchor)
            candidates = members[self.cameras[members] != self.cameras[anchor]]
            if candidates.size == 0:
                candidates = members[members != anchor]
            if candidates.size == 0 or self.K == 1:
                continue
            flat.extend(int(i) for i in rng.choice(candidates, size=self.K - 1,
                                                   replace=candidates.size < self.K))
        return flat

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0xCA])
        emitted, flat = 0, []
        while True:
            flat = flat + self.one_pass(rng)
            full = len(flat) // self.batch_size
            for b in range(full):
                if emitted == self.num_batches:
                    return
                yield flat[b * self.batch_size:(b + 1) * self.batch_size]
                emitted += 1
            # The community loader drops each pass's tail; a pass shorter than one batch (few clusters) would then
            # never yield, so only in that case the passes are joined.
            flat = [] if full else flat
