"""CUDA route for ops without a GPU kernel: run the C++ kernel on a host copy and move the results back.

DBSCAN is a sequential traversal over O(nnz) sparse entries, small next to the kNN GEMM that runs on the GPU; copying
its inputs to the host costs far less than a dense N x N GPU formulation would (docs/clustering.md).
"""

from __future__ import annotations

import torch


def run_on_host(op, *args):
    """``op(*args)`` with every tensor argument copied to the CPU; results go back to the first tensor's device."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    out = op(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    if isinstance(out, tuple):
        return tuple(t.to(device) for t in out)
    return out.to(device)
