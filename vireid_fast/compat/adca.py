"""ADCA drop-ins (``clustercontrast.models.cm`` and ``clustercontrast.utils.faiss_rerank`` of yangbincv/ADCA).

ADCA's training scripts import, and these modules replace::

    from clustercontrast.models.cm import ClusterMemory                      # -> vireid_fast.compat.adca
    from clustercontrast.utils.faiss_rerank import compute_jaccard_distance  # -> vireid_fast.compat.adca

Both are cluster-contrast's unchanged (same signatures, ``search_option=0`` default); ADCA keeps two memories, one
per modality, each reassigned every epoch.
"""

from ._cluster_memory import ClusterMemory
from .clustercontrast import compute_jaccard_distance

__all__ = ["ClusterMemory", "compute_jaccard_distance"]
