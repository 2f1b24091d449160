"""CUDA route of ``vireid::dbscan_dense``: no Triton kernel (docs/clustering.md); the C++ kernel runs on a host copy.

The step is a sparse, data-dependent graph computation over O(N * k1) entries, small next to the kNN GEMM that runs on
the GPU; copying its inputs to the host costs far less than a dense N x N GPU formulation would.
"""

from __future__ import annotations

import torch


def launch(*args):
    host = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    out = torch.ops.vireid.dbscan_dense(*host)
    if isinstance(out, tuple):
        return tuple(t.to(device) for t in out)
    return out.to(device)
