"""The method plug-in interface of the engine.

A method is a :class:`Method` subclass (a ``torch.nn.Module``) registered with ``@register_method("name")``. It
declares its config keys as a ``Params`` dataclass (validated like every other section; keys live under
``method:``), owns its parameters, memories (buffers), association and losses, and sees the engine only through a
:class:`MethodContext`. The engine calls, each epoch (0-based ``epoch``):

1. :meth:`Method.start_epoch` — schedule (progressive stages, loss weights by epoch);
2. extraction of both training sets with :meth:`Method.feature_encoder`, each image and its flip through
   :meth:`Method.embed` (a dict of named embeddings; the flip views are summed, the names in
   ``normalized_embeddings`` L2-normalised);
3. :meth:`Method.pseudo_label` — default: per-modality Jaccard + DBSCAN (:func:`jaccard_dbscan`), then
   :meth:`Method.associate`;
4. :meth:`Method.build_memories` — from the epoch's features and labels;
5. :meth:`Method.batch_sampler` — the epoch's batches (default: identity-balanced P x K per modality);
6. per iteration :meth:`Method.training_step` (losses, summed and stepped by the engine), then
   :meth:`Method.after_step`;
7. :meth:`Method.end_epoch` — extra values for the epoch's metrics row.

Parameters train with the encoder's (one optimiser), buffers and parameters are checkpointed with ``state_dict``
(buffers are resized from the checkpoint: memories change size every epoch), and anything else that must survive a
resume goes into ``get_extra_state``/``set_extra_state``. See docs/training.md for a worked example.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.samplers import IdentityBalancedSampler
from ..modality import INFRARED, MODALITIES, VISIBLE, Modality
from ..schema import spec
from .clustering import count_clusters, jaccard_dbscan

METHODS: dict[str, type[Method]] = {}

#: Per modality, the named embeddings of every training image in dataset order: ``features[VISIBLE]["feature"]``.
Features = dict[Modality, dict[str, torch.Tensor]]
#: Per modality, (N,) int64 pseudo-labels, -1 = outlier.
Labels = dict[Modality, torch.Tensor]


def register_method(name: str):
    """Class decorator: make a :class:`Method` subclass available as ``method.name: <name>``."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) needs a Method subclass, got {cls!r}")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def cluster_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, D) float32 L2-normalised mean feature of each cluster 0..C-1 (label -1 = outlier, excluded).

    features: (N, D) float, labels: (N,) int64 with clusters numbered 0..C-1.
    """
    valid = labels >= 0
    num = int(labels.max()) + 1 if bool(valid.any()) else 0
    sums = torch.zeros(num, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels[valid], features[valid].float())
    counts = torch.bincount(labels[valid], minlength=num).clamp(min=1).to(sums.dtype)
    return torch.nn.functional.normalize(sums / counts[:, None], dim=1).contiguous()


@dataclass
class TrainBatch:
    """One iteration's data: uint8 images (B, 3, H, W) on the device, int64 pseudo-labels (B,) on the device,
    dataset indices (B,) int64 on the CPU."""

    visible_images: torch.Tensor
    visible_labels: torch.Tensor
    visible_indices: torch.Tensor
    infrared_images: torch.Tensor
    infrared_labels: torch.Tensor
    infrared_indices: torch.Tensor


@dataclass
class MethodContext:
    """What a method sees of the engine (filled by the trainer; methods read it, they do not replace it).

    model: the encoder to call in training steps (wrapped by DDP in multi-process runs: call it, never reach into
    it); encoder: the same encoder unwrapped (parameters, ``feature_dim``); ema: the momentum encoder when the method
    sets ``uses_ema`` (updated by the engine after every optimiser step), else None; config: the run's validated
    config (read ``cluster``, ``train``, ``data``; methods keep their own keys in ``params``); augment: transforms by
    name, ``"train"`` (the usual augmentation) and ``"channel"`` (channel exchange), each ``uint8 (B, 3, H, W) ->
    float32 normalised``; autocast(): the run's autocast context; gather(x): the global batch in multi-process runs
    (identity otherwise, gradients flow back); extract(encoder=None): the training sets' features through
    :meth:`Method.embed` (:data:`Features`); log(msg); log_value(name, value): a per-iteration scalar averaged into
    the epoch's row as ``value/<name>`` (e.g. a loss computed without gradient); timed(phase): a context manager adding
    its wall time to ``time/<phase>`` of the epoch (nested phases are not double-counted); backward_step(loss):
    backward and an optimiser step now (for methods that step more than once per iteration); images(modality,
    indices): uint8 (B, 3, H, W) training images on the device (for batches a method draws itself, e.g. from a second
    sampler); ground_truth(): true identities per modality — only the supervised ceiling may read them;
    restart_optimizer(): a fresh Adam and learning-rate schedule from ``train.lr`` (call it from ``start_epoch``, e.g.
    when a new training stage begins; the schedule then counts epochs from there); cameras(modality): (N,) int64
    camera ids of the training images in dataset order (camera-aware samplers).
    """

    model: nn.Module
    encoder: nn.Module
    device: torch.device
    config: Any
    augment: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    autocast: Callable[[], contextlib.AbstractContextManager]
    gather: Callable[[torch.Tensor], torch.Tensor]
    extract: Callable[..., Features]
    log: Callable[..., None]
    log_value: Callable[[str, float], None]
    timed: Callable[[str], contextlib.AbstractContextManager]
    backward_step: Callable[[torch.Tensor], None]
    ground_truth: Callable[[], dict[Modality, np.ndarray]]
    images: Callable[[Modality, Iterable[int]], torch.Tensor] | None = None
    rank: int = 0
    world: int = 1
    seed: int = 0
    ema: nn.Module | None = field(default=None)
    restart_optimizer: Callable[[], None] | None = None
    cameras: Callable[[Modality], np.ndarray] | None = None


class CheckpointedGenerator:
    """Mixin for a method that draws its own random numbers from ``self.generator`` (a ``torch.Generator`` created in
    ``__init__``): the generator's state goes into the checkpoint, so a resumed run continues the same stream. List it
    before :class:`Method` in the bases."""

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        if state and "generator" in state:
            self.generator.set_state(state["generator"])


class Method(nn.Module):
    """Base class; see the module docstring for the hooks and their order."""

    name = "base"
    #: The engine keeps a momentum (EMA) copy of the encoder in ``context.ema`` (``model.ema_beta``); may be set per
    #: instance in ``__init__`` from ``params``.
    uses_ema = False
    #: False: the EMA encoder keeps the BatchNorm statistics of its own (train-mode) forwards instead of copying the
    #: trained encoder's after every step.
    ema_copies_buffers = True
    #: Labels of the two modalities index the same identities (after association), so the cross-modality
    #: pseudo-label precision/recall is meaningful and reported.
    shared_label_space = False
    #: Embeddings L2-normalised after the flip views are summed; ``"feature"`` is what evaluation and the default
    #: clustering use.
    normalized_embeddings: tuple[str, ...] = ("feature",)

    @dataclass
    class Params:
        name: str = spec("base", help="the registered method name")

    def __init__(self, params, context: MethodContext):
        super().__init__()
        self.params = params
        self.ctx = context

    # ------------------------------------------------------------------------------------------- per epoch
    def start_epoch(self, epoch: int) -> None:
        """Called first each epoch (0-based ``epoch``)."""

    def feature_encoder(self) -> nn.Module:
        """The encoder whose features are clustered and build the memories (default: the trained encoder)."""
        return self.ctx.encoder

    def eval_encoder(self) -> nn.Module:
        """The encoder evaluated on the test set (default: the trained encoder)."""
        return self.ctx.encoder

    def embed(self, model: nn.Module, images: torch.Tensor, modality: Modality) -> dict[str, torch.Tensor]:
        """Named (B, ...) float embeddings of a batch of normalised images: default ``{"feature": BNNeck output}``.
        ``model`` accepts ``outputs=("stage2", "stage3", "stage4", "pooled", "feature")`` for more than the
        embedding."""
        return {"feature": model(images, modality)}

    def finish_embeddings(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per extraction batch, after the two flip views of each embedding are summed: (B, ...) float32 tensors by
        name -> the stored ones. Default: the names in ``normalized_embeddings`` L2-normalised (override for other
        per-image post-processing, e.g. normalising parts of a concatenated feature separately)."""
        return {name: torch.nn.functional.normalize(f, dim=1) if name in self.normalized_embeddings else f
                for name, f in embeddings.items()}

    def pseudo_label(self, features: Features) -> Labels:
        """(N,) int64 labels per modality (-1 = outlier): per-modality Jaccard + DBSCAN, then :meth:`associate`."""
        c = self.ctx.config.cluster
        with self.ctx.timed("cluster"):
            labels = {m: jaccard_dbscan(features[m]["feature"], k1=c.k1, k2=c.k2, eps=c.eps,
                                        min_samples=c.min_samples) for m in MODALITIES}
        with self.ctx.timed("associate"):
            return self.associate(features, labels)

    def associate(self, features: Features, labels: Labels) -> Labels:
        """Per-modality cluster labels -> the labels to train with (default: unchanged, two label spaces)."""
        del features
        return labels

    def build_memories(self, features: Features, labels: Labels) -> None:
        """Initialise the epoch's memories from the features and labels (default: none)."""

    def shared_label_spaces(self, labels: Labels) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's cross-modality label spaces, for reporting only: by name, (visible (N_v,), infrared (N_r,))
        int64 labels that index one space (-1 = none). The engine scores the association on each as
        ``xmod/<name>/precision`` and ``/recall`` — ``xmod/precision`` / ``xmod/recall`` for the name ``""``, the
        method's main space. Called after :meth:`build_memories` with the epoch's labels. Default: ``{"": labels}``
        when ``shared_label_space``, else nothing. A method that matches clusters without relabelling maps one
        modality's labels onto the other's (PCLHD's PGM); one with several spaces names them (SALCR)."""
        return {"": (labels[VISIBLE], labels[INFRARED])} if self.shared_label_space else {}

    def batch_sampler(self, labels: Labels, epoch: int) -> dict[Modality, Iterable[list[int]]] | None:
        """Per modality a batch sampler (lists of dataset indices, ``train.iters`` batches; the engine zips the two);
        None skips training this epoch. Default: identity-balanced P x K batches per modality, P = min(P, clusters).
        """
        for m in MODALITIES:
            if count_clusters(labels[m]) == 0:
                self.ctx.log(f"epoch {epoch + 1}: no {m} clusters (all outliers); skipping training this epoch — "
                             "raise cluster.eps or lower cluster.min_samples")
                return None
        return {m: self.modality_sampler(labels[m], m, epoch) for m in MODALITIES}

    def modality_sampler(self, labels: torch.Tensor, modality: Modality, epoch: int, salt: int = 0):
        """One modality's batch sampler over (N,) int64 ``labels`` (-1 never sampled; at least one cluster),
        ``train.iters`` batches, seeded by (seed, modality, rank, ``salt``) and ``epoch``. Default: identity-balanced
        P x K, P = min(P, clusters)."""
        t = self.ctx.config.train
        sampler = IdentityBalancedSampler(labels.numpy(), min(t.num_identities, count_clusters(labels)),
                                          t.num_instances, seed=self.sampler_seed(modality, salt), num_batches=t.iters)
        sampler.set_epoch(epoch)
        return sampler

    def sampler_seed(self, modality: Modality, salt: int = 0) -> int:
        """The seed of a batch sampler of ``modality``: distinct per run seed, modality, process and ``salt``."""
        ctx = self.ctx
        return ctx.seed * 7919 + modality.code + 2 * ctx.rank + salt

    # ------------------------------------------------------------------------------------------- per iteration
    def training_step(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Losses of one iteration, by name (the engine sums them, steps and logs each as ``loss/<name>``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch)")

    def after_step(self, iteration: int) -> None:
        """After the optimiser step and the EMA update of iteration ``iteration`` (0-based within the epoch)."""

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """After the epoch's last iteration: extra values for its metrics row."""
        del epoch
        return {}

    # ------------------------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but buffers take the checkpoint's shape (memories change size every
        epoch) and a buffer registered as None is filled from the checkpoint."""
        for key, value in state_dict.items():
            owner_name, _, leaf = key.rpartition(".")
            try:
                owner = self.get_submodule(owner_name) if owner_name else self
            except AttributeError:
                continue
            if leaf in owner._buffers:
                current = owner._buffers[leaf]
                if current is None or current.shape != value.shape:
                    device = current.device if current is not None else self.ctx.device
                    owner._buffers[leaf] = torch.empty_like(value, device=device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["METHODS", "Features", "Labels", "Method", "MethodContext", "TrainBatch", "cluster_means", "get_method",
           "register_method", "INFRARED", "VISIBLE"]
