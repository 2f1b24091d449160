"""Input checks shared by the public op functions: errors name the argument and the fix.

Data-dependent checks (NaN/Inf, value ranges) are skipped while ``torch.compile`` traces, where they would break the
graph; shape, dtype and device checks always run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, x, *, dims: Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor")
    if dims is not None and x.dim() not in dims:
        shapes = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(x.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype {names}; got {got} (cast with .float())")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one element along every axis")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    if tracing() or not x.is_floating_point() or x.numel() == 0:
        return
    # min and max propagate NaN and reach +-Inf: one reduction pass without the N x d boolean mask of isfinite
    # (0.01 s instead of 0.2 s for 12,000 x 2,048).
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf; clean the input (e.g. torch.nan_to_num) before calling")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) on one device; anything else than a tensor is a TypeError naming it."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor")
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"inputs must be on one device, got {listing}; move them with .to(device)")


def check_same_width(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two (N, d) / (M, d) feature matrices must share d."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must share the feature dimension, got {a.shape[1]} and {b.shape[1]}")


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
