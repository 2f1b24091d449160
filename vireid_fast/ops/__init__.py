"""vireid ops: one ``torch.library`` op per module, with a reference in :mod:`vireid_fast.ops.reference`."""

from ._registry import BackendUnavailableError
from .memory_contrastive import memory_contrastive, memory_update
from .sinkhorn import SinkhornInfo, ot_assign, sinkhorn

__all__ = ["BackendUnavailableError", "SinkhornInfo", "memory_contrastive", "memory_update", "ot_assign", "sinkhorn"]
