"""Property-based tests (hypothesis) over the public ops: random shapes, dtypes, magnitudes up to the float limits, ties
and malformed CSR. Every case must give a correct result or a ValueError/TypeError, and the backends (the reference
and C++; Triton's interpreter is too slow for fuzzing and has its own tests) must agree: same result, or the same
error with the same message.

Profiles: ``default`` (part of ``make test``, bounded to well under 60 s on 2 vCPUs) and ``long`` (many more examples,
no time bound): ``HYPOTHESIS_PROFILE=long pytest tests/ops/test_properties.py``.

The C++ kNN used to crash (SIGSEGV) or return out-of-range indices once float32 scores overflowed (issue 18 item 1);
it now searches on power-of-two rescaled copies. The fuzzer covers magnitudes up to the float32 limit in-process, and
:func:`test_knn_overflowing_magnitudes_in_a_subprocess` keeps the original reproductions in a subprocess, so that a
regression to a crash fails the test instead of killing pytest.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import vireid_fast
from vireid_fast.ops import cmfp, dbscan, knn, kreciprocal_jaccard, memory_contrastive, sinkhorn

# No shrinking in the bounded profile: a failure prints its (unshrunk) example, and the time stays bounded.
settings.register_profile("default", max_examples=30, deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=500, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CPP_OK = vireid_fast.backends()["cpp"]["available"]
BACKENDS = ["reference", "cpp"] if CPP_OK else ["reference"]
KNN_MAX_MAGNITUDE = 3e38  # the float32 limit: scores overflow and the kernel must still be exact (module docstring)
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _outcome(fn):
    """("ok", result) or ("error", class name, message); anything other than ValueError/TypeError propagates."""
    try:
        return ("ok", fn())
    except (ValueError, TypeError) as exc:
        return ("error", type(exc).__name__, str(exc).split("\n")[0])


def _run_everywhere(fn):
    outcomes = {}
    saved = os.environ.get("VIREID_BACKEND")
    try:
        for name in BACKENDS:
            os.environ["VIREID_BACKEND"] = name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # unconverged Sinkhorn runs are part of the space
                outcomes[name] = _outcome(fn)
    finally:
        if saved is None:
            os.environ.pop("VIREID_BACKEND", None)
        else:
            os.environ["VIREID_BACKEND"] = saved
    kinds = {o[0] for o in outcomes.values()}
    assert len(kinds) == 1, f"backends disagree on whether the input is valid: {outcomes}"
    if kinds == {"error"}:
        assert len({o[1:] for o in outcomes.values()}) == 1, f"backends raise different errors: {outcomes}"
    return outcomes


@st.composite
def matrices(draw, max_rows=10, max_cols=6, max_magnitude=3e38, min_rows=1, ties=True, special=True, cols=None,
             dtype=None):
    """(rows, cols) float tensors: ordinary values, ties (few distinct values), huge magnitudes, sometimes NaN/Inf."""
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols)) if cols is None else cols
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if dtype is None else dtype
    limit = min(max_magnitude, float(torch.finfo(dtype).max))
    kind = draw(st.sampled_from(["normal", "ties", "huge"] if ties else ["normal", "huge"]))
    if kind == "ties":
        elements = st.sampled_from([-1.0, 0.0, 0.5, 1.0])
    elif kind == "huge":
        elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False)
    else:
        elements = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False)
    values = draw(st.lists(elements, min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(values, dtype=torch.float64).reshape(rows, cols).clamp(-limit, limit).to(dtype)
    if special and draw(st.integers(0, 9)) == 0:
        x.view(-1)[draw(st.integers(0, rows * cols - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    return x


@given(x=matrices(max_magnitude=KNN_MAX_MAGNITUDE), data=st.data())
def test_knn(x, data):
    k = data.draw(st.integers(0, x.shape[0] + 1))
    metric = data.draw(st.sampled_from(["ip", "l2"]))
    out = _run_everywhere(lambda: knn(x, k, metric=metric, precision="fp32"))
    result = next(iter(out.values()))
    if result[0] == "ok":
        vals, idx = result[1]
        for other in out.values():
            assert torch.equal(other[1][1], idx) and torch.equal(other[1][0], vals)
        # Correct: the reference is the float64 definition; indices in range and each row's scores sorted.
        assert int(idx.min()) >= 0 and int(idx.max()) < x.shape[0]
        xd = x.double()
        score = (xd[:, None, :] * xd[idx]).sum(-1)
        if metric == "l2":
            score = ((xd[:, None, :] - xd[idx]) ** 2).sum(-1)
        assert torch.isfinite(score).all()
    else:
        assert not (1 <= k <= x.shape[0]) or not bool(torch.isfinite(x).all()), result


@given(cost=matrices(max_rows=6, max_cols=6, max_magnitude=1e30), lam=st.sampled_from([0.5, 5.0, 50.0]),
       random_marginals=st.booleans(), data=st.data())
def test_sinkhorn(cost, lam, random_marginals, data):
    n, k = cost.shape
    a = b = None
    if random_marginals:
        a = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n)), dtype=torch.float64)
        b = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)), dtype=torch.float64)
        a, b = a / a.sum(), b / b.sum()
    out = _run_everywhere(lambda: sinkhorn(cost, lam, a, b, max_iter=300, tol=1e-7, return_info=True))
    first = next(iter(out.values()))
    if first[0] == "error":
        assert not bool(torch.isfinite(cost).all()), first
        return
    # The potentials absorb lam * cost; where that is large against their precision (float32 kernels: 2^-24, float64:
    # 2^-53) no log-domain solver can place the mass more finely than exp(eps * lam * spread). Within that budget the
    # mass must be kept; beyond it (huge lam * cost with a huge spread) the plan must still be finite and >= 0.
    spread = float(cost.double().max() - cost.double().min())
    eps = 2.0**-53 if cost.dtype == torch.float64 else 2.0**-24
    resolvable = lam * spread * eps <= 1e-6
    want_b = torch.full((k,), 1.0 / k, dtype=torch.float64) if b is None else b
    for plan, _ in (o[1] for o in out.values()):
        assert torch.isfinite(plan).all() and bool((plan >= 0).all())
        if resolvable:
            # Columns are exact after every iteration: the plan keeps its mass.
            np.testing.assert_allclose(plan.double().sum(0).numpy(), want_b.numpy(), atol=1e-4)
    infos = [o[1][1] for o in out.values()]
    plans = [o[1][0] for o in out.values()]
    if resolvable and all(float(i.err) <= 1e-7 for i in infos):
        for p in plans[1:]:
            torch.testing.assert_close(p.double(), plans[0].double(), atol=1e-4, rtol=0)


@st.composite
def distance_matrices(draw, max_n=9):
    n = draw(st.integers(1, max_n))
    levels = draw(st.sampled_from([[0.0, 0.3, 0.5, 1.0], [0.1, 0.2], [0.0, 0.5]]))
    values = draw(st.lists(st.sampled_from(levels), min_size=n * n, max_size=n * n))
    d = torch.tensor(values, dtype=draw(st.sampled_from([torch.float32, torch.float64]))).reshape(n, n)
    if draw(st.booleans()):
        d = torch.minimum(d, d.T)
    return d


def _sklearn(dense, eps, min_samples):
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense.numpy())


@given(dist=distance_matrices(), eps=st.sampled_from([0.2, 0.3, 0.5, 0.75]), min_samples=st.integers(1, 4))
def test_dbscan_dense(dist, eps, min_samples):
    out = _run_everywhere(lambda: dbscan(dist, eps, min_samples))
    for o in out.values():
        assert o[0] == "ok", o
        assert np.array_equal(o[1].numpy(), _sklearn(dist, eps, min_samples))


@given(dist=distance_matrices(), fill=st.sampled_from([1.0, 0.0, 0.3, float("inf"), float("nan")]),
       eps=st.sampled_from([0.2, 0.3, 0.5]), min_samples=st.integers(1, 4),
       damage=st.sampled_from(["none", "none", "crow0", "last", "decrease", "col_high", "col_negative", "duplicate",
                               "crow_short", "nan_value"]), data=st.data())
def test_dbscan_csr_valid_or_refused(dist, fill, eps, min_samples, damage, data):
    n = dist.shape[0]
    keep = dist != fill if fill == fill else torch.ones_like(dist, dtype=torch.bool)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = keep.sum(1).cumsum(0)
    col = torch.nonzero(keep)[:, 1].contiguous()
    values = dist[keep].clone()
    nnz = col.numel()
    damaged = damage != "none"
    if damage == "crow0":
        crow[0] = 1
    elif damage == "last":
        crow[-1] = nnz + 1
    elif damage == "decrease" and n >= 2:
        crow[1] = crow[2] + 1
    elif damage == "col_high" and nnz:
        col[data.draw(st.integers(0, nnz - 1))] = n
    elif damage == "col_negative" and nnz:
        col[data.draw(st.integers(0, nnz - 1))] = -1
    elif damage == "duplicate" and bool((crow.diff() >= 2).any()):
        row = int(torch.nonzero(crow.diff() >= 2)[0])
        col[int(crow[row]) + 1] = col[int(crow[row])]
    elif damage == "crow_short" and n >= 2:
        crow = crow[:-1]
    elif damage == "nan_value" and nnz:
        values[0] = float("nan")
    else:
        damaged = False  # this damage does not apply to this matrix: it stays intact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)
    out = _run_everywhere(lambda: dbscan(csr, eps, min_samples, fill=fill))
    first = next(iter(out.values()))
    # Intact and with a real fill: sklearn's labels on the dense matrix. Damaged or fill=NaN: a ValueError.
    if not damaged and fill == fill:
        expected = _sklearn(dist, eps, min_samples)
        for o in out.values():
            assert o[0] == "ok", o
            assert np.array_equal(o[1].numpy(), expected)
    else:
        assert first[0] == "error" and first[1] == "ValueError", first


@given(feats=matrices(min_rows=3, max_rows=9, max_cols=4, max_magnitude=1e30), data=st.data())
def test_kreciprocal_jaccard(feats, data):
    n = feats.shape[0]
    k1 = data.draw(st.integers(1, n))
    k2 = data.draw(st.integers(1, max(1, k1)))
    if bool(torch.isfinite(feats).all()):
        norm = feats.double().norm(dim=1, keepdim=True)
        assume(bool((norm > 0).all()) and bool(torch.isfinite(norm).all()))
        feats = (feats.double() / norm).to(feats.dtype)  # the op expects L2-normalised features
    out = _run_everywhere(lambda: kreciprocal_jaccard(feats, k1, k2))
    first = next(iter(out.values()))
    if first[0] == "ok":
        for o in out.values():
            torch.testing.assert_close(o[1], first[1], atol=1e-6, rtol=0)
        assert bool(((first[1] >= 0) & (first[1] <= 1)).all())
    else:
        assert k1 >= n or not bool(torch.isfinite(feats).all()), first


@given(fv=matrices(min_rows=1, max_rows=7, max_cols=4, max_magnitude=1e15, special=True),
       data=st.data())
def test_cmfp(fv, data):
    nr = data.draw(st.integers(1, 7))
    fr = data.draw(matrices(min_rows=nr, max_rows=nr, max_magnitude=1e15, cols=fv.shape[1], dtype=fv.dtype))
    k = data.draw(st.integers(0, 8))
    out = _run_everywhere(lambda: cmfp(fv, fr, k))
    first = next(iter(out.values()))
    if first[0] == "ok":
        for o in out.values():
            torch.testing.assert_close(o[1].prop_v.double(), first[1].prop_v.double(), atol=2e-3, rtol=0)
            torch.testing.assert_close(o[1].prop_r.double(), first[1].prop_r.double(), atol=2e-3, rtol=0)
        assert torch.isfinite(first[1].prop_v).all()
    else:
        finite = bool(torch.isfinite(fv).all()) and bool(torch.isfinite(fr).all())
        assert not 1 <= k <= min(fv.shape[0], nr) or not finite, first


@given(inputs=matrices(min_rows=1, max_rows=6, max_cols=5, max_magnitude=1e30), data=st.data())
def test_memory_contrastive(inputs, data):
    batch, dim = inputs.shape
    classes = data.draw(st.integers(1, 5))
    memory0 = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(
        data.draw(st.integers(0, 99)))), dim=1)
    targets = torch.tensor(data.draw(st.lists(st.integers(-1, classes), min_size=batch, max_size=batch)))
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9]))
    update = data.draw(st.sampled_from(["sequential", "hard", "mean"]))
    results = {}

    def run():
        memory = memory0.clone()
        x = inputs.detach().clone().requires_grad_()
        loss = memory_contrastive(x, targets, memory, momentum=momentum, update=update)
        loss.backward()
        return loss.detach().double(), x.grad.double(), memory

    out = _run_everywhere(run)
    first = next(iter(out.values()))
    if first[0] == "error":
        assert (not bool(torch.isfinite(inputs).all()) or int(targets.min()) < 0
                or int(targets.max()) >= classes), first
        return
    for name, o in out.items():
        loss, grad, memory = o[1]
        assert torch.isfinite(memory).all(), name  # never NaN in memory
        results[name] = o[1]
    if len(results) > 1:
        ref, cpp = results["reference"], results["cpp"]
        torch.testing.assert_close(cpp[0], ref[0], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(cpp[2], ref[2], atol=1e-3, rtol=1e-3)


_KNN_OVERFLOW = """
import torch, vireid_fast
from vireid_fast.ops import knn
from vireid_fast.ops.reference import knn_ref
cases = [torch.tensor([[1.9e19]]), torch.tensor([[2e19], [1e19]]), torch.tensor([[3e38, -3e38], [1e20, 5.0]]),
         torch.tensor([[1e30, 1e30], [-1e30, 1e30], [1e30, -1e30]])]
for x in cases:
    for metric in ("ip", "l2"):
        for k in range(1, x.shape[0] + 1):
            try:
                vals, idx = torch.ops.vireid.knn(x, x, k, metric, "fp32")
            except ValueError:
                continue  # a clear refusal is acceptable
            ref_vals, ref_idx = knn_ref(x, x, k, metric, "fp32")
            assert torch.equal(idx, ref_idx), (x, metric, k, idx, ref_idx)
print("ok")
"""


@pytest.mark.skipif(not CPP_OK, reason="needs the compiled extension")
def test_knn_overflowing_magnitudes_in_a_subprocess():
    env = {**os.environ, "VIREID_BACKEND": "cpp", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KNN_OVERFLOW], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
