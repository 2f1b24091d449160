"""vireid ops: one ``torch.library`` op per module, with a reference in :mod:`vireid_fast.ops.reference`."""

from ._registry import BackendUnavailableError
from .cmfp import CMFPResult, cmfp, cmfp_rerank
from .sinkhorn import SinkhornInfo, ot_assign, sinkhorn

__all__ = ["BackendUnavailableError", "CMFPResult", "cmfp", "cmfp_rerank", "SinkhornInfo", "ot_assign", "sinkhorn"]
