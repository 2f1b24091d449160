"""Entropic optimal transport (Sinkhorn) and OT label assignment — MULT Eq. 6, SALCR Eq. 4 (DAGL), OTLA.

``sinkhorn`` solves ``min_P <P, C> - H(P)/lam`` s.t. ``P 1 = a``, ``P^T 1 = b`` in the log domain, so it returns a
finite plan for any finite cost and ``lam`` up to 1000 (the community's linear-domain solver returns NaN once
``exp(-lam * C)`` underflows, e.g. lam=25 on squared distances near 4).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from . import _registry
from ._checks import check_sinkhorn, finite, number
from ._validation import FLOAT_DTYPES, check_int, check_same_device, check_same_width, check_tensor, tracing
from .reference import sinkhorn_ref

__all__ = ["SinkhornInfo", "ot_assign", "sinkhorn", "sinkhorn_ref"]


class SinkhornInfo(NamedTuple):
    """Convergence record: ``n_iter`` (B,) int64 iterations run, ``err`` (B,) float64 final L1 marginal error."""

    n_iter: torch.Tensor
    err: torch.Tensor


def _sinkhorn_fake(cost, lam, a, b, max_iter, tol):
    batch = cost.shape[0]
    return (torch.empty_like(cost), cost.new_empty((batch,), dtype=torch.int64),
            cost.new_empty((batch,), dtype=torch.float64))


def _with_reference_repair(kernel):
    """The C++ kernel, except where its plan is not finite: there the reference's result is returned. The C++ kernel
    keeps the plan as exp(f + g - lam C) with log-domain potentials; when lam * cost spans ~1e31 within a row
    (float64), f + g - lam C cancels beyond double precision and the plan turns NaN, while the reference's
    max-shifted final form stays exact (tests/ops/test_validation.py pins the case)."""

    def run(cost, lam, a, b, max_iter, tol):
        plan, n_iter, err = kernel(cost, lam, a, b, max_iter, tol)
        if plan.numel() and not bool(torch.isfinite(plan).all()):
            return sinkhorn_ref(cost, lam, a, b, max_iter, tol)
        return plan, n_iter, err

    return run


_registry.register("sinkhorn", reference=sinkhorn_ref, fake=_sinkhorn_fake, check=check_sinkhorn,
                   cpu_wrapper=_with_reference_repair)


def _marginal(name: str, m: torch.Tensor | None, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    if m is None:
        return torch.full((batch, length), 1.0 / length, dtype=torch.float64, device=like.device)
    check_tensor(name, m, dims=(1, 2), dtypes=FLOAT_DTYPES)
    if m.shape[-1] != length or (m.dim() == 2 and m.shape[0] != batch):
        expected = f"({length},) or ({batch}, {length})"
        raise ValueError(f"{name} must have shape {expected} to match cost, got {tuple(m.shape)}")
    return m.to(torch.float64).expand(batch, length).contiguous()  # values are checked by the op (_checks)


def sinkhorn(cost: torch.Tensor, lam: float, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             max_iter: int = 1000, tol: float = 1e-6, return_info: bool = False):
    """Entropic OT plan by log-domain Sinkhorn.

    Args:
        cost: (N, K) or batched (B, N, K) float32/float64 (bf16/fp16 accepted, computed in float32); finite.
        lam: the λ of ``exp(-λ·cost)`` (inverse entropic regularisation), > 0.
        a: (N,) or (B, N) row marginals, positive; default uniform 1/N.
        b: (K,) or (B, K) column marginals, positive, same total mass as ``a``; default uniform 1/K.
        max_iter: iteration cap (one iteration = a column and a row update).
        tol: stop once the L1 error of the row sums against ``a`` is <= tol (column sums are exact after each
            iteration).
        return_info: also return a :class:`SinkhornInfo`.
    Returns:
        plan with cost's shape, float64 for float64 cost and float32 otherwise; with ``return_info``,
        ``(plan, SinkhornInfo)``.
    """
    return _sinkhorn(cost, lam, a, b, max_iter, tol, return_info)


def _sinkhorn(cost, lam, a, b, max_iter, tol, return_info, warn_stacklevel: int = 3):
    check_tensor("cost", cost, dims=(2, 3), dtypes=FLOAT_DTYPES)
    lam = number("lam", lam, positive=True)
    check_int("max_iter", max_iter, 1)
    tol = number("tol", tol, lower=0.0, allow_inf=True)
    check_same_device(cost=cost, a=a, b=b)
    batched = cost.dim() == 3
    cost3 = cost if batched else cost.unsqueeze(0)
    if cost3.dtype not in (torch.float32, torch.float64):
        cost3 = cost3.float()
    batch, n, k = cost3.shape
    a2 = _marginal("a", a, batch, n, cost3)
    b2 = _marginal("b", b, batch, k, cost3)
    cost3 = cost3.contiguous()
    backend = _registry.choose_backend("sinkhorn", cost3.device)
    plan, n_iter, err = _registry.run("sinkhorn", backend, cost3.device, cost3, lam, a2, b2, max_iter, tol)
    if not tracing():
        worst = float(err.max())
        if not worst <= tol:
            # The default warnings filter shows this once per call site.
            warnings.warn(f"sinkhorn stopped at max_iter={max_iter} with err={worst:.3g} > tol={tol:g} (L1 error of "
                          "the plan's row sums): the plan is not converged; raise max_iter, loosen tol, or lower lam "
                          "(a large lam * cost converges slowly)", RuntimeWarning, stacklevel=warn_stacklevel)
    if not batched:
        plan = plan.squeeze(0)
    return (plan, SinkhornInfo(n_iter, err)) if return_info else plan


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, d), (K, d) -> (N, K) squared Euclidean distances, clamped at 0, in float32 or float64."""
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0)


def ot_assign(features: torch.Tensor, prototypes: torch.Tensor, lam: float, a: torch.Tensor | None = None,
              b: torch.Tensor | None = None, *, max_iter: int = 1000, tol: float = 1e-6):
    """Assign instances to prototypes by the argmax of an entropic OT plan (OTLA / SALCR DAGL semantics).

    Args:
        features: (N, d) instance features (the seeds pass L2-normalised ones).
        prototypes: (K, d) cluster centres of the other modality.
        lam: λ of the plan (SALCR: 5, MULT: 25).
    Returns:
        labels (N,) int64 in [0, K), plan (N, K) with row sums ``a`` (default 1/N).
    """
    check_tensor("features", features, dims=(2,), dtypes=FLOAT_DTYPES)
    check_tensor("prototypes", prototypes, dims=(2,), dtypes=FLOAT_DTYPES)
    check_same_width("features", features, "prototypes", prototypes)
    check_same_device(features=features, prototypes=prototypes)
    finite("features", features)
    finite("prototypes", prototypes)
    cost = squared_euclidean(features, prototypes)
    if not tracing() and not math.isfinite(float(cost.max())):
        big = max(float(features.detach().abs().max()), float(prototypes.detach().abs().max()))
        raise ValueError(f"features and prototypes are too large for {cost.dtype}: their squared distances overflow "
                         f"(largest |entry| {big:.3g}); rescale them, e.g. L2-normalise (the seeds do), or pass "
                         "float64")
    plan = _sinkhorn(cost, lam, a, b, max_iter, tol, False, warn_stacklevel=4)
    return plan.argmax(dim=1), plan
