"""The method plug-in interface of the engine.

A method is a :class:`Method` subclass registered with ``@register_method("name")``. It declares its config keys as
a ``Params`` dataclass (validated like every other section; keys live under ``method:``), and overrides the hooks
the engine calls each epoch:

1. :meth:`start_epoch` — schedule (progressive stages, loss weights by epoch);
2. :meth:`associate` — after per-modality clustering: relabel or link clusters across modalities;
3. :meth:`build_memories` — from the epoch's features and pseudo-labels (outliers -1 excluded);
4. :meth:`training_step` — per iteration: losses from a visible and an infrared P×K batch.

Memories and any other per-run state go into :meth:`state` / :meth:`load_state` so checkpoints resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import spec

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.trainer import TrainBatch, Trainer

METHODS: dict[str, type[Method]] = {}


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


class Method:
    """Base class; see the module docstring for the hooks."""

    name = "base"

    @dataclass
    class Params:
        name: str = spec("base", help="the registered method name")

    def __init__(self, params, trainer: Trainer):
        self.params = params
        self.trainer = trainer

    def start_epoch(self, epoch: int) -> None:
        """Called before extraction each epoch (0-based ``epoch``)."""

    def associate(self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        """Pseudo-labels per modality after clustering -> the labels to train with (default: unchanged)."""
        return labels

    def build_memories(self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def training_step(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Losses of one iteration (summed by the engine): ``{"visible": loss, ...}``."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        del state
