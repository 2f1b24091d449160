"""CUDA route of ``vireid::dbscan_csr``: no GPU kernel; the C++ kernel runs on a host copy (see ``_host_route``)."""

from __future__ import annotations

import torch

from ._host_route import run_on_host


def launch(*args):
    return run_on_host(torch.ops.vireid.dbscan_csr, *args)
