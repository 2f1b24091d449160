"""The training engine: :class:`Trainer`, checkpoints, multi-process helpers, metrics."""

from . import pretrain  # noqa: F401  (registers model.pretrained: synthetic)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import TrainBatch, Trainer

__all__ = ["CheckpointError", "TrainBatch", "Trainer", "load_checkpoint", "save_checkpoint"]
