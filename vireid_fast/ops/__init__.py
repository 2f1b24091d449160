"""vireid ops: one ``torch.library`` op per module, with a reference in :mod:`vireid_fast.ops.reference`."""

from ._registry import BackendUnavailableError
from .cmfp import CMFPResult, cmfp, cmfp_rerank
from .memory_contrastive import memory_contrastive, memory_update
from .sinkhorn import SinkhornInfo, ot_assign, sinkhorn

__all__ = [
    "BackendUnavailableError", "CMFPResult", "SinkhornInfo", "cmfp", "cmfp_rerank", "memory_contrastive",
    "memory_update", "ot_assign", "sinkhorn",
]
