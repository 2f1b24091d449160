"""vireid_fast: fast, exact ops and a lean trainer for unsupervised visible-infrared person re-identification."""

from __future__ import annotations

from . import _extension

__version__ = "0.1.0"

_extension.load()

from . import ops  # noqa: E402


def backends() -> dict[str, dict[str, object]]:
    """What can run here: ``{"cpp"|"triton"|"cuda": {"available": bool, "reason": str}}``."""
    import torch

    from .ops._registry import triton_status

    cpp_ok, cpp_reason = _extension.status()
    triton_ok, triton_reason = triton_status()
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        cuda_reason = f"{torch.cuda.device_count()} device(s)"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is a CPU build"
    else:
        cuda_reason = "no CUDA device visible"
    return {
        "cpp": {"available": cpp_ok, "reason": cpp_reason},
        "triton": {"available": triton_ok, "reason": triton_reason},
        "cuda": {"available": cuda_ok, "reason": cuda_reason},
    }


__all__ = ["__version__", "backends", "ops"]
