"""The validation layer of every registered op: one ``check_<op>`` per ``vireid::<op>``, on the schema's arguments.

:func:`vireid_fast.ops._registry.register` runs the op's check in front of every kernel it registers — the CPU kernel
(which then calls the compiled ``vireid::_<op>_cpu``), the CUDA/Triton kernel, the reference (every other device and
the no-extension fallback) and the fake kernel — so ``torch.ops.vireid.<op>`` and the public functions raise the same
``ValueError``/``TypeError`` for the same bad input, whichever backend runs.

Shape, dtype and scalar checks run everywhere, fake tensors included (they hold under ``torch.compile``); checks that
read values (NaN/Inf, ranges, CSR structure) run on real tensors only, i.e. when the kernel executes.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ._validation import check_int, check_same_device, check_tensor, tracing

FLOATS = (torch.float32, torch.float64)


def has_values(*tensors: torch.Tensor | None) -> bool:
    """Whether the tensors hold data that may be read: not while ``torch.compile`` traces, not fake or meta tensors.
    (The compiled graph calls the op, whose kernels run these checks on the real tensors.)"""
    if tracing():
        return False
    return all(t is None or not (isinstance(t, FakeTensor) or t.is_meta) for t in tensors)


def finite(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0 or not x.is_floating_point() or not has_values(x):
        return
    lo, hi = torch.aminmax(x.detach())  # one pass, propagates NaN, no N x d boolean mask
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf; clean the input (e.g. torch.nan_to_num) before calling")


def not_nan(name: str, x: torch.Tensor, why: str) -> None:
    """NaN refused, +-inf allowed (``why``: where infinite values legitimately come from)."""
    if x.numel() == 0 or not x.is_floating_point() or not has_values(x):
        return
    if bool(torch.isnan(torch.amax(x.detach()))):  # amax propagates NaN
        raise ValueError(f"{name} contains NaN ({why}); clean the input (e.g. torch.nan_to_num) before calling")


def number(name: str, value, *, positive: bool = False, lower: float | None = None, upper: float | None = None,
           allow_inf: bool = False, what: str = "") -> float:
    """A float argument: a finite number (or +inf with ``allow_inf``) within the given bounds; ``what`` explains it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    lo = "> 0" if positive else (f">= {lower:g}" if lower is not None else "")
    bounds = " and ".join(b for b in (lo, f"< {upper:g}" if upper is not None else "") if b)
    if (math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)) or (positive and not value > 0)
            or (lower is not None and value < lower) or (upper is not None and not value < upper)):
        kind = "a number (+inf allowed, not NaN or -inf)" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind}{' ' + bounds if bounds else ''}{what}, got {value}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")


same_device = check_same_device


def int_range(name: str, t: torch.Tensor, lo: int, hi: int, fix: str) -> None:
    """Every entry of the integer tensor ``t`` in [lo, hi)."""
    if t.numel() == 0 or not has_values(t):
        return
    mn, mx = (int(v) for v in torch.aminmax(t))
    if mn < lo or mx >= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}), got values in [{mn}, {mx}]; {fix}")


# ------------------------------------------------------------------------------------------------------------------
# One check per op, taking exactly the schema's arguments (csrc/schemas.cpp).
# ------------------------------------------------------------------------------------------------------------------


def check_knn(x, y, k, metric, precision) -> None:
    check_tensor("x", x, dims=(2,), dtypes=(torch.float32,))
    check_tensor("y", y, dims=(2,), dtypes=(torch.float32,))
    same_device(x=x, y=y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    check_int("k", k, 1)
    if k > y.shape[0]:
        raise ValueError(f"k={k} is larger than the number of database rows ({y.shape[0]}); pass k <= {y.shape[0]}")
    choice("metric", metric, ("ip", "l2"))
    choice("precision", precision, ("fp32", "bf16"))
    finite("x", x)
    if y is not x:
        finite("y", y)


def check_cmfp(features_v, features_r, k) -> None:
    check_tensor("features_v", features_v, dims=(2,), dtypes=FLOATS)
    check_tensor("features_r", features_r, dims=(2,), dtypes=FLOATS)
    if features_v.dtype != features_r.dtype:
        raise TypeError(f"features_v and features_r must share a dtype, got {features_v.dtype} and "
                        f"{features_r.dtype}; cast one with .to(other.dtype)")
    same_device(features_v=features_v, features_r=features_r)
    if features_v.shape[1] != features_r.shape[1]:
        raise ValueError(f"features_v and features_r must share the feature dimension, got {features_v.shape[1]} "
                         f"and {features_r.shape[1]}")
    check_int("k", k, 1)
    limit = min(features_v.shape[0], features_r.shape[0])
    if k > limit:
        raise ValueError(f"k must be in [1, min(N_v, N_r)] = [1, {limit}] (neighbours kept per row and block), got "
                         f"{k}; lower k or pass more features")
    finite("features_v", features_v)
    finite("features_r", features_r)


def check_kreciprocal_jaccard(features, initial_rank, rank_sim, k2, modality) -> None:
    check_tensor("features", features, dims=(2,), dtypes=(torch.float32,))
    n = features.shape[0]
    check_tensor("initial_rank", initial_rank, dims=(2,), dtypes=(torch.int64,))
    k1 = initial_rank.shape[1]
    if initial_rank.shape[0] != n:
        raise ValueError(f"initial_rank must have one row per feature, N={n}, got shape {tuple(initial_rank.shape)}")
    if k1 > n:
        raise ValueError(f"initial_rank has k1={k1} columns but there are only N={n} features; pass k1 <= {n}")
    check_int("k2", k2, 1)
    if k2 > k1:
        raise ValueError(f"k2={k2} must be <= k1={k1}")
    if rank_sim is not None:
        check_tensor("rank_sim", rank_sim, dims=(2,), dtypes=(torch.float32,))
        if rank_sim.shape != initial_rank.shape:
            raise ValueError(f"rank_sim must have initial_rank's shape {tuple(initial_rank.shape)}, got "
                             f"{tuple(rank_sim.shape)}")
    if modality is not None:
        check_tensor("modality", modality, dims=(1,), dtypes=(torch.int64,))
        if modality.shape[0] != n:
            raise ValueError(f"modality must be (N,) = ({n},), got shape {tuple(modality.shape)}")
    same_device(features=features, initial_rank=initial_rank, rank_sim=rank_sim, modality=modality)
    finite("features", features)
    int_range("initial_rank", initial_rank, 0, n, "entries are row indices of features")
    if rank_sim is not None:
        # knn's float32 scores of finite features beyond ~1.8e19 overflow to +-inf; the kernel recomputes them exactly
        not_nan("rank_sim", rank_sim, "+-inf is accepted: knn returns it when float32 scores overflow")
    if modality is not None:
        int_range("modality", modality, 0, 2, "use 0 for visible and 1 for infrared")


def check_dbscan_params(eps, min_samples) -> float:
    eps = number("eps", eps, positive=True)
    check_int("min_samples", min_samples, 1)
    return eps


def check_dbscan_dense(dist, eps, min_samples) -> None:
    check_tensor("dist", dist, dims=(2,), dtypes=FLOATS)
    if dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be square (N, N), got shape {tuple(dist.shape)}")
    check_dbscan_params(eps, min_samples)
    finite("dist", dist)


def check_dbscan_csr(crow, col, values, eps, min_samples, fill) -> None:
    """A CSR (N, N) distance: crow (N+1,) int64, col (nnz,) int64, values (nnz,) float32/64; one O(nnz) pass."""
    check_tensor("crow", crow, dims=(1,), dtypes=(torch.int64,))
    check_tensor("col", col, dims=(1,), dtypes=(torch.int64,), allow_empty=True)
    check_tensor("values", values, dims=(1,), dtypes=FLOATS, allow_empty=True)
    same_device(crow=crow, col=col, values=values)
    n, nnz = crow.shape[0] - 1, col.shape[0]
    if n < 1:
        raise ValueError("crow must have N + 1 >= 2 entries (one more than the rows of dist), got 1")
    if values.shape[0] != nnz:
        raise ValueError(f"values must hold one value per column index, got {values.shape[0]} values and {nnz} "
                         "column indices")
    check_dbscan_params(eps, min_samples)
    number("fill", fill, allow_inf=True)
    if not has_values(crow, col, values):
        return
    ends = crow[[0, -1]].tolist()
    if ends != [0, nnz]:
        raise ValueError(f"dist's CSR crow must start at 0 and end at nnz={nnz}, got {ends[0]} and {ends[1]}; "
                         "build it with torch.sparse_csr_tensor from valid indices (or .to_sparse_csr())")
    steps = crow.diff()
    if bool((steps < 0).any()):
        row = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"dist's CSR crow must be non-decreasing, but crow[{row + 1}] < crow[{row}]; "
                         "rebuild the sparse matrix")
    if nnz:
        int_range("dist's CSR col", col, 0, n, "column indices must index the N rows of the square dist")
        rows = torch.repeat_interleave(torch.arange(n, device=crow.device), steps)
        key = rows * n + col
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (key[1:] <= key[:-1])).any()):  # not strictly sorted within rows: look closer
            ordered = torch.sort(key).values
            dup = ordered[1:] == ordered[:-1]
            if bool(dup.any()):
                k = int(ordered[1:][dup][0])
                raise ValueError(f"dist has duplicate entries in row {k // n} (column {k % n}); coalesce the sparse "
                                 "matrix first")
    finite("dist's CSR values", values)


def check_sinkhorn(cost, lam, a, b, max_iter, tol) -> None:
    check_tensor("cost", cost, dims=(3,), dtypes=FLOATS)
    batch, n, k = cost.shape
    number("lam", lam, positive=True)
    for name, m, length in (("a", a, n), ("b", b, k)):
        check_tensor(name, m, dims=(2,), dtypes=(torch.float64,))
        if tuple(m.shape) != (batch, length):
            raise ValueError(f"{name} must have shape ({batch}, {length}) to match cost {tuple(cost.shape)}, got "
                             f"{tuple(m.shape)}")
    check_int("max_iter", max_iter, 1)
    number("tol", tol, lower=0.0, allow_inf=True)
    same_device(cost=cost, a=a, b=b)
    finite("cost", cost)
    for name, m in (("a", a), ("b", b)):
        finite(name, m)
        if has_values(m) and not bool((m > 0).all()):
            raise ValueError(f"{name} must be strictly positive; drop zero-mass rows/columns from cost before calling")
    if has_values(a, b):
        sa, sb = a.sum(1), b.sum(1)
        if not bool(torch.allclose(sa, sb, rtol=1e-5, atol=0.0)):
            raise ValueError(f"a and b must have the same total mass, got {sa.tolist()} and {sb.tolist()}; "
                             "normalise both to sum to 1")


MEMORY_UPDATE_MODES = ("sequential", "hard", "mean", "none")


def _check_memory_args(inputs_name, inputs, targets, memory, momentum, update, temp=None, soft_targets=None) -> None:
    check_tensor(inputs_name, inputs, dims=(2,), dtypes=(torch.float32, torch.float64, torch.bfloat16,
                                                       torch.float16))
    check_tensor("memory", memory, dims=(2,), dtypes=FLOATS)
    if inputs.shape[1] != memory.shape[1]:
        raise ValueError(f"{inputs_name} (B, D) and memory (C, D) must share D, got {inputs.shape[1]} and "
                         f"{memory.shape[1]}")
    check_tensor("targets", targets, dims=(1,), dtypes=(torch.int64,))
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"targets must be (B,) = ({inputs.shape[0]},) to match {inputs_name}, got shape "
                         f"{tuple(targets.shape)}")
    if temp is not None:
        number("temp", temp, positive=True)
    number("momentum", momentum, lower=0.0, upper=1.0, what=" (the weight kept by the old prototype)")
    choice("update", update, MEMORY_UPDATE_MODES)
    batch, classes = inputs.shape[0], memory.shape[0]
    if soft_targets is not None:
        check_tensor("soft_targets", soft_targets, dims=(2,), dtypes=(torch.float32, torch.float64,
                                                                      torch.bfloat16, torch.float16))
        if tuple(soft_targets.shape) != (batch, classes):
            raise ValueError(f"soft_targets must be (B, C) = ({batch}, {classes}), got {tuple(soft_targets.shape)}")
    same_device(**{inputs_name: inputs}, targets=targets, memory=memory, soft_targets=soft_targets)
    int_range("targets", targets, 0, classes, "relabel the batch or rebuild the memory with one row per label")


def check_memory_contrastive(inputs, targets, memory, soft_targets, temp, momentum, update) -> None:
    _check_memory_args("inputs", inputs, targets, memory, momentum, update, temp, soft_targets)
    if soft_targets is not None and has_values(soft_targets):
        finite("soft_targets", soft_targets)
        sums = soft_targets.detach().double().sum(1)
        tol = 1e-3 if soft_targets.dtype in FLOATS else 2e-2
        if bool((sums - 1).abs().max() > tol) or bool((soft_targets < 0).any()):
            raise ValueError("soft_targets rows must be probability distributions (non-negative, summing to 1); got "
                             f"row sums in [{float(sums.min()):.4g}, {float(sums.max()):.4g}]; use softmax or divide "
                             "by the row sum")


def after_memory_contrastive(args, out) -> None:
    """A non-finite loss names its cause (one scalar test instead of scanning inputs and memory every call)."""
    inputs, _, memory, soft_targets = args[:4]
    loss = out[0]
    if not has_values(loss) or math.isfinite(loss.item()):
        return
    finite("inputs", inputs)
    finite("memory", memory)
    raise ValueError("the loss is not finite although inputs and memory are; check for rows of memory that are "
                     "zero (they cannot be normalised) or a temp so small that the logits overflow")


def check_memory_contrastive_backward(grad_loss, inputs, targets, memory, soft_targets, logits, lse, temp, momentum,
                                      update) -> None:
    _check_memory_args("inputs", inputs, targets, memory, momentum, update, temp, soft_targets)
    batch, classes = inputs.shape[0], memory.shape[0]
    check_tensor("grad_loss", grad_loss, dtypes=FLOATS + (torch.bfloat16, torch.float16))
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element (the loss is a scalar), got shape {tuple(grad_loss.shape)}")
    check_tensor("logits", logits, dims=(2,), dtypes=FLOATS)
    check_tensor("lse", lse, dims=(1,), dtypes=FLOATS)
    if tuple(logits.shape) != (batch, classes) or tuple(lse.shape) != (batch,):
        raise ValueError(f"logits must be (B, C) = ({batch}, {classes}) and lse (B,), got {tuple(logits.shape)} and "
                         f"{tuple(lse.shape)}; pass the forward's outputs")
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous because it is updated in place; pass memory.contiguous()")


def check_memory_update(normalized, targets, memory, momentum, update) -> None:
    _check_memory_args("normalized", normalized, targets, memory, momentum, update)
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous because it is updated in place; pass memory.contiguous()")
    finite("normalized", normalized)
