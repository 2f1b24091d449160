"""vireid ops: one ``torch.library`` op per module, with a reference in :mod:`vireid_fast.ops.reference`."""

from ._registry import BackendUnavailableError
from .dbscan import dbscan
from .jaccard import kreciprocal_jaccard
from .knn import knn
from .sinkhorn import SinkhornInfo, ot_assign, sinkhorn

__all__ = ["BackendUnavailableError", "SinkhornInfo", "dbscan", "knn", "kreciprocal_jaccard", "ot_assign", "sinkhorn"]
