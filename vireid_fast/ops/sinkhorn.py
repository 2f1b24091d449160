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

__all__ = ["SinkhornInfo", "ot_assign", "sinkhorn", "sinkhorn_ref", "sinkhorn_reference_stop"]


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
              b: torch.Tensor | None = None, *, max_iter: int = 1000, tol: float = 1e-6, stop: str = "converged"):
    """Assign instances to prototypes by the argmax of an entropic OT plan (OTLA / SALCR DAGL semantics).

    Args:
        features: (N, d) instance features (the seeds pass L2-normalised ones).
        prototypes: (K, d) cluster centres of the other modality.
        lam: λ of the plan (SALCR: 5, MULT: 25).
        stop: ``"converged"`` — the log-domain :func:`sinkhorn` op until the row-marginal L1 error is <= ``tol``;
            ``"reference"`` — the seeds' stop rule (:func:`sinkhorn_reference_stop`: linear domain in the cost's
            float dtype, uniform marginals, err = sum_c |beta_c / beta'_c - 1| checked on iterations 0, 10, 20, ...,
            stop once err <= ``tol`` or after ``max_iter`` iterations; pass ``tol=0.1, max_iter=500`` for the
            community values). ``a`` and ``b`` must be None with ``"reference"``.
    Returns:
        labels (N,) int64 in [0, K), plan (N, K) with row sums ``a`` (default 1/N; with ``"reference"``, the
        unconverged plan as the seeds have it).
    """
    if stop not in ("converged", "reference"):
        raise ValueError(f"stop must be 'converged' or 'reference', got {stop!r}")
    if stop == "reference" and (a is not None or b is not None):
        raise ValueError("ot_assign(stop='reference') uses the seeds' uniform marginals; pass a=None and b=None "
                         "(or stop='converged' for custom marginals)")
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
    if stop == "reference":
        plan, _ = sinkhorn_reference_stop(cost, lam, max_iter=max_iter, tol=tol)
        return plan.argmax(dim=1), plan
    plan = _sinkhorn(cost, lam, a, b, max_iter, tol, False, warn_stacklevel=4)
    return plan.argmax(dim=1), plan


def sinkhorn_reference_stop(cost: torch.Tensor, lam: float, *, max_iter: int = 500, tol: float = 0.1,
                            check_every: int = 10) -> tuple[torch.Tensor, int]:
    """The community Sinkhorn-Knopp with its stop rule (SALCR/MULT ``sinkhorn_solver``), on an (N, K) cost.

    K = exp(-lam cost), a = 1/N, b = 1/K, beta = b; each iteration alpha = a / (K beta), beta' = b / (K^T alpha); on
    iterations 0, check_every, 2 check_every, ... err = sum_c |beta_c / beta'_c - 1|; beta <- beta'; stop after the
    first checked iteration with err <= tol (so after m check_every + 1 iterations), or after ``max_iter``.
    Linear domain in cost's float dtype (float32 as the seeds; exp(-lam cost) must not underflow: the seeds' lam 5
    on squared distances of unit-norm features is safe). Memory O(N K), no (N, N) matrix.

    Returns:
        plan (N, K) = diag(alpha) K diag(beta), iterations run.
    """
    check_tensor("cost", cost, dims=(2,), dtypes=FLOAT_DTYPES)
    lam = number("lam", lam, positive=True)
    check_int("max_iter", max_iter, 1)
    check_int("check_every", check_every, 1)
    tol = number("tol", tol, lower=0.0, allow_inf=True)
    finite("cost", cost)
    n, k = cost.shape
    if n == 0 or k == 0:
        raise ValueError(f"cost must be non-empty (N, K), got {tuple(cost.shape)}")
    kernel = torch.exp(-lam * cost)
    if not tracing() and bool((kernel.sum(1) == 0).any() | (kernel.sum(0) == 0).any()):
        raise ValueError(f"exp(-lam * cost) underflows to 0 on a whole row or column (lam={lam:g}, largest cost "
                         f"{float(cost.max()):.3g}) in {cost.dtype}; lower lam or use stop='converged' (log domain)")
    a, b = 1.0 / n, 1.0 / k
    beta = torch.full((k,), b, dtype=cost.dtype, device=cost.device)
    alpha = torch.full((n,), a, dtype=cost.dtype, device=cost.device)
    step = 0
    while step < max_iter:
        alpha = a / (kernel @ beta)
        beta_new = b / (kernel.T @ alpha)
        check = step % check_every == 0
        err = float((beta / beta_new - 1).abs().nansum()) if check else None
        beta = beta_new
        step += 1
        if check and err <= tol:
            break
    return alpha[:, None] * kernel * beta[None, :], step
