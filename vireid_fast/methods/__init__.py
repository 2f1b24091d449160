"""Training methods as plug-ins of the engine (see :mod:`vireid_fast.methods.base`). Built in: ``dcl`` (ADCA's
dual-contrastive baseline), ``pclhd`` / ``pclhd_official`` / ``pclhd_paper`` (PCLHD presets), ``hil`` / ``hil_paper``
(HIL presets), ``mult`` / ``mult_paper`` (MULT presets), ``salcr`` / ``salcr_paper`` (SALCR presets), ``swpcl``
(vireid_fast interpretation) and ``supervised`` (the ceiling: the same memory losses on true identities)."""

from .base import (
    METHODS,
    Features,
    Labels,
    Method,
    MethodContext,
    TrainBatch,
    cluster_means,
    get_method,
    register_method,
)
from .clustering import count_clusters, jaccard_dbscan
from .dcl import DCL
from .hil import HIL, HILPaper
from .mult import MULT, MULTPaper
from .pclhd import PCLHD, PCLHDOfficial, PCLHDPaper
from .salcr import SALCR, SALCRPaper
from .supervised import Supervised
from .swpcl import SWPCL

__all__ = ["DCL", "HIL", "HILPaper", "METHODS", "MULT", "MULTPaper",
           "PCLHD", "PCLHDOfficial", "PCLHDPaper", "Features", "Labels", "Method", "MethodContext",
           "SALCR", "SALCRPaper", "SWPCL", "Supervised", "TrainBatch",
           "cluster_means", "count_clusters", "get_method", "jaccard_dbscan", "register_method"]
