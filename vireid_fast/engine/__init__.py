"""The training engine: :class:`Trainer`, checkpoints, multi-process helpers, metrics."""

from . import pretrain  # noqa: F401  (registers model.pretrained: synthetic)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import NonFiniteLossError, TrainBatch, Trainer

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainBatch", "Trainer", "load_checkpoint", "save_checkpoint"]
