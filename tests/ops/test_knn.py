"""kNN op: every backend against an independent float64 brute force (ties by lower index), the bf16 candidate path
against the fp32 one on adversarial near-ties, bad inputs, opcheck and torch.compile."""

import numpy as np
import pytest
import torch

import vireid_fast  # noqa: F401  (loads the extension)
from vireid_fast.ops import knn
from vireid_fast.ops.reference import knn_ref


def brute_force(x: torch.Tensor, y: torch.Tensor, k: int, metric: str):
    xd, yd = x.double().numpy(), y.double().numpy()
    dots = xd @ yd.T
    if metric == "ip":
        key = -dots
    else:
        key = (xd * xd).sum(1)[:, None] + (yd * yd).sum(1)[None, :] - 2 * dots
    cols = np.arange(y.shape[0])
    order = np.stack([np.lexsort((cols, row))[:k] for row in key])  # key first, then the lower index
    vals = np.take_along_axis(key, order, 1)
    return (-vals if metric == "ip" else np.maximum(vals, 0)), order


CASES = [  # (N, M or None for self, d, k)
    (1, None, 4, 1),
    (37, 53, 16, 5),
    (129, None, 33, 20),
    (1100, None, 8, 3),  # more than one tile: exercises the symmetric (transposed) merge
    (70, 1030, 5, 7),
]


def _run(backend_name, backend, x, k, y, metric, precision):
    backend(backend_name)
    return knn(x, k, y, metric=metric, precision=precision)


@pytest.mark.parametrize("backend_name, precision", [("cpp", "fp32"), ("cpp", "bf16"), ("reference", "fp32")])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force(backend, backend_name, metric, precision, case):
    n, m, d, k = case
    gen = torch.Generator().manual_seed(n * 7 + d)
    x = torch.randn(n, d, generator=gen)
    y = None if m is None else torch.randn(m, d, generator=gen)
    vals, idx = _run(backend_name, backend, x, k, y, metric, precision)
    ref_vals, ref_idx = brute_force(x, x if y is None else y, k, metric)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and vals.shape == (n, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ties_go_to_lower_index(backend, metric, precision):
    # Small integers: every score is exact, so duplicated rows tie exactly.
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (12, 6), generator=gen).float()
    y = base[torch.randint(0, 12, (200,), generator=gen)]
    x = base[:9]
    backend("cpp")
    vals, idx = knn(x, 25, y, metric=metric, precision=precision)
    ref_vals, ref_idx = brute_force(x, y, 25, metric)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(vals.numpy(), ref_vals.astype(np.float32))


def test_bf16_candidates_return_the_fp32_result_on_near_ties(backend):
    # Scores differ by ~1e-6: far below bf16 resolution (2^-8), inside the candidate margin. The bf16 search must
    # re-score and return exactly the fp32 answer, order and values.
    gen = torch.Generator().manual_seed(11)
    d = 64
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = direction.repeat(300, 1) + 1e-6 * torch.randn(300, d, generator=gen)
    y[::3] = torch.nn.functional.normalize(torch.randn(100, d, generator=gen), dim=1)  # far rows
    x = torch.stack([direction, -direction, direction + 1e-7])
    backend("cpp")
    # bf16 pools hold C = k + max(5k, 64) candidates. k=10 among 200 near-ties (C=74): the margin overflows and those
    # rows take the fp32 pass. k=40 among the same 200 (C=240) and k=10 among 20 near-ties (y2): all fit, so the order
    # comes from the exact re-score alone.
    y2 = torch.cat([y[1:60:3], torch.nn.functional.normalize(torch.randn(200, d, generator=gen), dim=1)])
    for metric in ("ip", "l2"):
        for k, db in ((10, y), (40, y), (10, y2)):
            v32, i32 = knn(x, k, db, metric=metric, precision="fp32")
            v16, i16 = knn(x, k, db, metric=metric, precision="bf16")
            assert torch.equal(i32, i16) and torch.equal(v32, v16)
            _, ref_idx = brute_force(x, db, k, metric)
            np.testing.assert_array_equal(i32.numpy(), ref_idx)


def test_values_are_detached():
    x = torch.randn(40, 8, requires_grad=True)
    values, _ = knn(x, 3)
    assert not values.requires_grad and values.grad_fn is None


def test_reference_is_the_definition():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(2))
    for metric in ("l2", "ip"):
        vals, idx = knn_ref(x, x, 6, metric, "fp32")
        ref_vals, ref_idx = brute_force(x, x, 6, metric)
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
        # The values are the float32 roundings of the float64 scores (the l2 expansion's float64 rounding aside).
        np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-6, atol=1e-6)
        assert idx.is_contiguous() and vals.is_contiguous()
    vals, idx = knn_ref(x, x, 6, "l2", "fp32")
    assert (idx[:, 0] == torch.arange(40)).all()  # the point itself comes first


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.randn(5)), ValueError, r"x must be 2-D, got shape \(5,\)"),
    (dict(x=torch.randn(0, 3)), ValueError, "x is empty"),
    (dict(k=0), ValueError, "k must be >= 1, got 0"),
    (dict(k=6), ValueError, r"k=6 is larger than the number of database rows \(5\); pass k <= 5"),
    (dict(k=2.0), TypeError, "k must be an int, got float"),
    (dict(x=torch.tensor([[float("nan"), 1.0]] * 5)), ValueError, "x contains NaN or Inf"),
    (dict(y=torch.tensor([[float("inf"), 1.0]] * 5)), ValueError, "y contains NaN or Inf"),
    (dict(y=torch.randn(5, 3)), ValueError, "x and y must have the same number of columns, got 2 and 3"),
    (dict(metric="cos"), ValueError, "metric must be one of 'ip', 'l2', got 'cos'"),
    (dict(precision="fp8"), ValueError, "precision must be one of 'auto', 'fp32', 'bf16', got 'fp8'"),
    (dict(x=torch.ones(5, 2, dtype=torch.int64)), TypeError, "x must have dtype float32.*got int64"),
    (dict(x=[[1.0, 2.0]] * 5), TypeError, "x must be a torch.Tensor, got list"),
])
def test_bad_inputs(bad, error, match):
    args = dict(x=torch.randn(5, 2), k=3, y=None, metric="ip", precision="fp32") | bad
    with pytest.raises(error, match=match):
        knn(args.pop("x"), args.pop("k"), args.pop("y"), **args)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_opcheck(precision):
    x = torch.randn(20, 8)
    y = torch.randn(31, 8)
    torch.library.opcheck(torch.ops.vireid.knn.default, (x, y, 4, "l2", precision))
    torch.library.opcheck(torch.ops.vireid.knn.default, (x, x, 4, "ip", precision))


def test_torch_compile_fullgraph():
    x = torch.randn(64, 16)

    @torch.compile(fullgraph=True, backend="inductor")
    def top(z):
        vals, idx = knn(z, 5, metric="ip")
        return vals * 2, idx

    vals, idx = top(x)
    ref_vals, ref_idx = brute_force(x, x, 5, "ip")
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(vals.numpy(), 2 * ref_vals, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_triton_kernel_under_interpreter(backend, metric):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, 24, generator=gen)
    y = torch.randn(45, 24, generator=gen)
    backend("triton")
    vals, idx = knn(x, 3, y, metric=metric)
    ref_vals, ref_idx = brute_force(x, y, 3, metric)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-6, atol=1e-6)
    # Self search with exact ties (duplicated integer rows), the candidate margin and the exact fallback.
    base = torch.randint(-2, 3, (5, 8), generator=gen).float()
    z = base[torch.randint(0, 5, (40,), generator=gen)]
    vals, idx = knn(z, 4, metric=metric)
    ref_vals, ref_idx = brute_force(z, z, 4, metric)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(vals.numpy(), ref_vals.astype(np.float32))


@pytest.mark.parametrize("op", ["knn", "kreciprocal_jaccard", "dbscan_dense", "dbscan_csr"])
def test_python_schema_mirror_matches_the_extension(op):
    from vireid_fast.ops._schemas import SCHEMAS

    registered = str(getattr(torch.ops.vireid, op).default._schema).replace("vireid::", "")
    assert registered == SCHEMAS[op]
