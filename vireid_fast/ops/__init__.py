"""vireid ops: one ``torch.library`` op per module, with a reference in :mod:`vireid_fast.ops.reference`."""

from ._registry import BackendUnavailableError
from .cmfp import CMFPResult, cmfp, cmfp_rerank
from .dbscan import dbscan
from .jaccard import kreciprocal_jaccard
from .knn import knn
from .memory_contrastive import memory_contrastive, memory_update
from .sinkhorn import SinkhornInfo, ot_assign, sinkhorn

__all__ = [
    "BackendUnavailableError", "CMFPResult", "SinkhornInfo", "cmfp", "cmfp_rerank", "dbscan", "knn",
    "kreciprocal_jaccard", "memory_contrastive", "memory_update", "ot_assign", "sinkhorn",
]
