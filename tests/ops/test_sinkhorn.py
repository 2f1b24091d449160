"""Sinkhorn: every backend against the reference and against POT; stability, batching, validation, torch.compile."""

import math

import numpy as np
import pytest
import torch

import vireid_fast
from vireid_fast.ops import sinkhorn
from vireid_fast.ops.reference import sinkhorn_ref

ot = pytest.importorskip("ot")

CPP_OK = vireid_fast.backends()["cpp"]["available"]
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")


def _cost(n, k, scale=1.0, seed=0, dtype=torch.float64, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, k) if batch is None else (batch, n, k)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _squared_distances(n, k, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return torch.cdist(x, p) ** 2  # in [0, 4]


def _antipodal_case(n, k, d=16):
    """Squared distances up to 4 where some instances sit opposite every prototype (exp(-25 * C) underflows)."""
    g = torch.Generator().manual_seed(5)
    centre = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    protos = torch.nn.functional.normalize(centre + 0.1 * torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).double()[:, None]
    noise = torch.where(sign < 0, 0.02, 0.3) * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.nn.functional.normalize(sign * centre + noise, dim=1)
    return torch.cdist(x, protos) ** 2


def _pot_plan(cost, lam, a=None, b=None):
    c = cost.double().numpy()
    a = np.full(c.shape[0], 1.0 / c.shape[0]) if a is None else a.double().numpy()
    b = np.full(c.shape[1], 1.0 / c.shape[1]) if b is None else b.double().numpy()
    return torch.from_numpy(ot.bregman.sinkhorn_log(a, b, c, reg=1.0 / lam, numItermax=100000, stopThr=1e-13))


BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=pytest.mark.triton)]
# (dtype, tolerance on max|P - P_POT| * N): the acceptance bounds of the foundation issue.
DTYPES = [(torch.float64, 1e-9), (torch.float32, 1e-5)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype,tol_rowmass", DTYPES)
@pytest.mark.parametrize("n,k,lam", [(1, 1, 3.0), (37, 5, 2.0), (130, 67, 5.0), (64, 200, 10.0)])
def test_matches_pot(backend, name, dtype, tol_rowmass, n, k, lam):
    if name == "triton" and n * k > 10000:
        pytest.skip("interpreter: keep Triton cases small")
    backend(name)
    cost = _cost(n, k, dtype=dtype, seed=n + k)
    plan, info = sinkhorn(cost, lam, tol=1e-13 if dtype == torch.float64 else 1e-6, max_iter=5000, return_info=True)
    expected = _pot_plan(cost, lam)
    assert plan.dtype == dtype and plan.shape == (n, k)
    assert float((plan.double() - expected).abs().max()) * n <= tol_rowmass
    assert torch.isfinite(plan).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_non_uniform_marginals(backend, name):
    backend(name)
    g = torch.Generator().manual_seed(3)
    cost = _cost(40, 9, dtype=torch.float64, seed=4)
    a = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    plan = sinkhorn(cost, 4.0, a, b, tol=1e-13, max_iter=5000)
    assert float((plan - _pot_plan(cost, 4.0, a, b)).abs().max()) * 40 <= 1e-9


@pytest.mark.parametrize(
    "name,lam,dtype",
    [
        ("reference", 25.0, torch.float32),
        pytest.param("cpp", 25.0, torch.float32, marks=needs_cpp),
        pytest.param("triton", 25.0, torch.float32, marks=pytest.mark.triton),
    ]
    # lam=1000 needs thousands of iterations: too slow for the Triton interpreter (its finiteness is tested below).
    + [("reference", 1000.0, torch.float64), pytest.param("cpp", 1000.0, torch.float64, marks=needs_cpp)],
)
def test_large_lambda_is_finite_and_within_tol(backend, name, lam, dtype):
    """The community linear-domain solver underflows here (exp(-25 * 4) in float32) and returns NaN."""
    backend(name)
    n = 90
    cost = _antipodal_case(n, 12).to(dtype)
    tol = 1e-5
    plan, info = sinkhorn(cost, lam, tol=tol, max_iter=20000, return_info=True)
    assert torch.isfinite(plan).all()
    row_err = float((plan.double().sum(1) - 1 / n).abs().sum())
    col_err = float((plan.double().sum(0) - 1 / 12).abs().sum())
    assert float(info.err[0]) <= tol
    assert row_err <= tol * 1.01 + 1e-6 and col_err <= 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_float32_lambda_1000_is_finite(backend, name):
    """float32 keeps no NaN/Inf at lam=1000; its accuracy is bounded by lam * max(cost) * eps32 (documented)."""
    backend(name)
    cost = _antipodal_case(90, 12).float()
    max_iter = 20 if name == "triton" else 2000  # every iterate must be finite, converged or not
    plan, info = sinkhorn(cost, 1000.0, tol=1e-5, max_iter=max_iter, return_info=True)
    assert torch.isfinite(plan).all() and torch.isfinite(info.err).all()
    assert float((plan.double().sum(0) - 1 / 12).abs().sum()) <= 1000.0 * 4.0 * 1.2e-7 * 12


def test_linear_domain_solver_really_fails_on_that_case():
    """Keeps the claim above honest: exp(-lam * C) underflows float32 and the classic iteration divides by zero."""
    cost = _antipodal_case(90, 12).float()
    kernel = torch.exp(-25.0 * cost)
    assert float(kernel.sum(1).min()) < 1e-40  # rows of (sub)normal-underflowed weights
    u = torch.full((90,), 1 / 90)
    v = torch.full((12,), 1 / 12)
    with np.errstate(all="ignore"):
        for _ in range(50):
            u = (1 / 90) / (kernel @ v)
            v = (1 / 12) / (kernel.T @ u)
    assert not torch.isfinite(u[:, None] * kernel * v[None, :]).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_batched_equals_looped(backend, name, dtype, atol):
    backend(name)
    cost = _cost(33, 17, scale=3.0, dtype=dtype, batch=4, seed=9)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    plan, info = sinkhorn(cost, 6.0, tol=tol, return_info=True)
    for i in range(4):
        single, single_info = sinkhorn(cost[i], 6.0, tol=tol, return_info=True)
        assert torch.allclose(plan[i], single, atol=atol / 33, rtol=0)
        assert int(info.n_iter[i]) == int(single_info.n_iter[0])


NATIVE = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("dtype,atol_rowmass", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,k", [(1, 7), (7, 1), (65, 129), (300, 70)])
def test_backend_matches_reference(backend, name, dtype, atol_rowmass, n, k):
    cost = _squared_distances(n, k, seed=n * k).to(dtype)
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    b = torch.full((1, k), 1.0 / k, dtype=torch.float64)
    ref_plan, ref_iter, _ = sinkhorn_ref(cost[None], 8.0, a, b, 200, 1e-8)
    backend(name)
    plan, info = sinkhorn(cost, 8.0, tol=1e-8, max_iter=200, return_info=True)
    assert float((plan.double() - ref_plan[0].double()).abs().max()) * n <= atol_rowmass
    if dtype == torch.float64:
        assert int(info.n_iter[0]) == int(ref_iter[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_low_precision_inputs_computed_in_float32(backend, name):
    backend(name)
    cost = _squared_distances(20, 6, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        plan = sinkhorn(cost.to(dtype), 5.0, tol=1e-7)
        ref = sinkhorn(cost.to(dtype).float(), 5.0, tol=1e-7)
        assert plan.dtype == torch.float32
        assert torch.allclose(plan, ref, atol=1e-7)


def test_max_iter_cap_and_info(backend):
    backend("reference")
    cost = _squared_distances(50, 10, seed=2)
    plan, info = sinkhorn(cost, 50.0, tol=0.0, max_iter=3, return_info=True)
    assert int(info.n_iter[0]) == 3 and float(info.err[0]) > 0
    # Columns are exact after every iteration, whatever the row error.
    assert torch.allclose(plan.sum(0), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-12)


def test_ot_assign_labels_are_plan_argmax():
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    noise = 0.05 * torch.randn(20, 8, generator=g)
    feats = torch.nn.functional.normalize(protos.repeat_interleave(4, 0) + noise, dim=1)
    labels, plan = vireid_fast.ops.ot_assign(feats, protos, 5.0)
    assert torch.equal(labels, plan.argmax(1))
    assert torch.equal(labels, torch.arange(5).repeat_interleave(4))
    assert math.isclose(float(plan.sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cost=torch.tensor([[0.0, float("nan")]])), "cost contains NaN"),
        (dict(cost=torch.tensor([[0.0, float("inf")]])), "cost contains NaN"),
        (dict(cost=torch.ones(3)), "cost must be 2-D or 3-D"),
        (dict(cost=torch.ones(2, 2, 2, 2)), "cost must be 2-D or 3-D"),
        (dict(cost=torch.ones(0, 3)), "cost is empty"),
        (dict(lam=0.0), "lam must be"),
        (dict(lam=-1.0), "lam must be"),
        (dict(a=torch.tensor([0.5, 0.6, -0.1])), "a must be strictly positive"),
        (dict(a=torch.tensor([0.5, 0.5])), "a must have shape"),
        (dict(b=torch.tensor([0.2, 0.2, 0.6])), "b must have shape"),
        (dict(a=torch.tensor([0.5, 0.5, 0.5])), "same total mass"),
        (dict(max_iter=0), "max_iter must be"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(cost=torch.rand(3, 2), lam=1.0, a=None, b=None)
    max_iter = kwargs.pop("max_iter", 10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sinkhorn(args["cost"], args["lam"], args["a"], args["b"], max_iter=max_iter)


def test_integer_cost_is_a_type_error():
    with pytest.raises(TypeError, match="cost must have dtype"):
        sinkhorn(torch.ones(2, 2, dtype=torch.int64), 1.0)


def test_opcheck():  # the registered op: C++ on CPU, or the reference in the fallback
    cost = _cost(23, 11, dtype=torch.float32, batch=2)
    a = torch.full((2, 23), 1 / 23, dtype=torch.float64)
    b = torch.full((2, 11), 1 / 11, dtype=torch.float64)
    for c in (cost, cost.double()):
        torch.library.opcheck(torch.ops.vireid.sinkhorn.default, (c, 5.0, a, b, 100, 1e-6))


def test_torch_compile_fullgraph():
    def assign(cost):
        return sinkhorn(cost, 5.0, tol=1e-6).argmax(dim=1)

    compiled = torch.compile(assign, fullgraph=True, backend="eager")
    cost = _squared_distances(40, 7).float()
    assert torch.equal(compiled(cost), assign(cost))
