"""Memory-bank variants of the seed methods, as modules over the memory ops.

* :class:`HybridMemory`, :class:`DynamicMemory` — PCLHD hybrid (mean + hard) and dynamic prototypes;
* :class:`MultiCentreMemory` — HIL multi-centre memory with the MCCL loss;
* :class:`InstanceMemory` — instance memory with a positive-set loss (SALCR GPCR, HIL neighbours);
* :class:`SoftPrototypeMemory` — SWPCL as ``shared/spec/methods/swpcl.md`` specifies it (centroid negatives, soft
  weights, rank-matched top-K update); :class:`SoftWeightPrototypeMemory` — an earlier reading of the abstract
  (softmax over every soft prototype, similarity-power weights), kept for its users;
* :func:`mult_soft_labels`, :func:`sharpened_targets`, :func:`oclr_loss` — MULT soft labels and OCLR.

The plain cluster memory is :func:`vireid_fast.ops.memory_contrastive` (module form:
:class:`vireid_fast.compat.clustercontrast.ClusterMemory`).
"""

from .cluster import DynamicMemory, HybridMemory, MultiCentreMemory
from .instance import InstanceMemory, positive_set_loss, positives_from_csr
from .soft import mult_soft_labels, oclr_loss, sharpened_targets
from .soft_weight import SoftPrototypeMemory, SoftWeightPrototypeMemory

__all__ = ["DynamicMemory", "HybridMemory", "InstanceMemory", "MultiCentreMemory", "SoftPrototypeMemory",
           "SoftWeightPrototypeMemory",
           "mult_soft_labels", "oclr_loss", "positive_set_loss", "positives_from_csr", "sharpened_targets"]
