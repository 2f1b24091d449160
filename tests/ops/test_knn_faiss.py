"""kNN with faiss proposing the candidates (engine="faiss"): bit-identical to vireid::knn, ties by the lower index,
thin margins redone by our kernel; engine selection with and without faiss."""

import importlib
import sys

import numpy as np
import pytest
import torch

import vireid_fast  # noqa: F401  (loads the extension)
from vireid_fast import _extension
from vireid_fast.ops import knn
from vireid_fast.ops.reference import knn_ref

from .test_knn import brute_force

knn_module = importlib.import_module("vireid_fast.ops.knn")  # the attribute vireid_fast.ops.knn is the function
knn_faiss_module = importlib.import_module("vireid_fast.ops.knn_faiss")

needs_faiss = pytest.mark.skipif(not knn_faiss_module.faiss_available("cpu"),
                                 reason="faiss is not installed (pip install faiss-cpu)")


def assert_same_as_vireid(x, y, k, metric, vals, idx, check_ref=True):
    """Bit-identical to our kernel (the C++ one when the extension is built); indices equal to the float64 oracle."""
    yy = x if y is None else y
    ours_vals, ours_idx = torch.ops.vireid.knn(x, yy, k, metric, "fp32")
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and vals.shape == (x.shape[0], k)
    if check_ref:
        ref_vals, ref_idx = knn_ref(x, yy, k, metric, "fp32")
        np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
        # knn_ref sums in another order: its values may differ in the last float64 bits, so by a float32 ulp at most.
        np.testing.assert_allclose(vals.numpy(), ref_vals.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), ours_idx.numpy())
    if _extension.status()[0]:
        np.testing.assert_array_equal(vals.view(torch.int32).numpy(), ours_vals.view(torch.int32).numpy())


CASES = [  # (N, M or None for self, d, k)
    (1, None, 4, 1),  # N = 1, k = M
    (1, 40, 7, 3),
    (37, 53, 16, 5),
    (129, None, 33, 20),  # d not a multiple of 8
    (64, 10, 12, 10),  # k = M < C: faiss returns every column
    (200, None, 5, 1),  # k = 1
    (70, 1030, 67, 33),
]


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("case", CASES)
def test_matches_vireid_bit_for_bit(metric, case):
    n, m, d, k = case
    gen = torch.Generator().manual_seed(n * 13 + d)
    x = torch.randn(n, d, generator=gen)
    y = None if m is None else 3.0 * torch.randn(m, d, generator=gen) + 0.5
    vals, idx = knn(x, k, y, metric=metric, engine="faiss")
    assert_same_as_vireid(x, y, k, metric, vals, idx)


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_chunked_search_and_rescore(monkeypatch, metric):
    # Small chunks: several faiss calls and re-score chunks must stitch together exactly.
    monkeypatch.setattr(knn_faiss_module, "_SEARCH_ROWS", 45)
    monkeypatch.setattr(knn_faiss_module, "_ACC_BUDGET", 8 * 40 * 7)
    monkeypatch.setattr(knn_faiss_module, "_RESCORE_BUDGET", 100)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(160, 24, generator=gen)
    vals, idx = knn(x, 12, metric=metric, engine="faiss")
    assert_same_as_vireid(x, None, 12, metric, vals, idx)


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_go_to_lower_index(metric):
    # Small integers: every score is exact, so duplicated rows tie exactly; faiss orders them arbitrarily.
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (12, 6), generator=gen).float()
    y = base[torch.randint(0, 12, (200,), generator=gen)]
    x = base[:9]
    vals, idx = knn(x, 25, y, metric=metric, engine="faiss")
    ref_vals, ref_idx = brute_force(x, y, 25, metric)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(vals.numpy(), ref_vals.astype(np.float32))
    assert_same_as_vireid(x, y, 25, metric, vals, idx)


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_thin_margins_are_redone_by_our_kernel(monkeypatch, metric):
    if metric == "l2" and not _extension.status()[0]:
        pytest.skip("l2 near-ties at 1e-14 are ordered by the float64 summation order: compared with the C++ kernel")
    # 200 rows within ~1e-7 of each other in score: far inside faiss's float32 error bound, and more of them than
    # the C = 2k candidates faiss returns, so the margin check must send those queries to vireid::knn.
    gen = torch.Generator().manual_seed(11)
    d = 64
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = direction.repeat(300, 1) + 1e-7 * torch.randn(300, d, generator=gen)
    y[::3] = torch.nn.functional.normalize(torch.randn(100, d, generator=gen), dim=1)  # far rows
    far = torch.nn.functional.normalize(torch.randn(4, d, generator=gen), dim=1)
    x = torch.cat([torch.stack([direction, direction + 1e-7]), far])
    redone = []
    exact_search = knn_faiss_module._exact_search

    def spy(rows, yy, k, metric_):
        redone.append(rows.shape[0])
        return exact_search(rows, yy, k, metric_)

    monkeypatch.setattr(knn_faiss_module, "_exact_search", spy)
    vals, idx = knn(x, 40, y, metric=metric, engine="faiss")
    assert redone and redone[0] >= 2  # the two near-tie queries at least
    # l2 keys of these rows differ by ~1e-14 of ||x||^2 + ||y||^2 ~ 2: the float64 summation order decides them, and
    # knn_ref sums in another order than the C++ kernel (whose order the faiss engine follows).
    assert_same_as_vireid(x, y, 40, metric, vals, idx, check_ref=metric == "ip")


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_near_ties_inside_the_margin_are_rescored(monkeypatch, metric):
    # 20 rows whose scores are ~3e-7 apart (below faiss's error bound, so faiss may misorder them) and far rows: the
    # margin check passes, and more than k candidates must be re-scored to order them exactly.
    gen = torch.Generator().manual_seed(2)
    d = 32
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    near = direction * (1.0 - 3e-7 * torch.arange(20.0))[:, None]
    near = near[torch.randperm(20, generator=gen)]
    far = 0.3 * torch.nn.functional.normalize(torch.randn(200, d, generator=gen), dim=1)
    y = torch.cat([far[:100], near, far[100:]])
    x = torch.stack([direction, 1.01 * direction])
    widths = []
    exact_keys = knn_faiss_module._exact_keys

    def spy(*args):
        widths.append(args[4].shape[1])
        return exact_keys(*args)

    monkeypatch.setattr(knn_faiss_module, "_exact_keys", spy)
    vals, idx = knn(x, 5, y, metric=metric, engine="faiss")
    assert widths and max(widths) > 5
    assert_same_as_vireid(x, y, 5, metric, vals, idx)


@needs_faiss
def test_float64_input_and_validation():
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    vals, idx = knn(x, 4, engine="faiss")
    assert not vals.requires_grad
    x = x.detach()
    assert_same_as_vireid(x.float(), None, 4, "ip", vals, idx)
    with pytest.raises(ValueError, match="engine"):
        knn(x, 4, engine="faiss-gpu")
    with pytest.raises(ValueError, match="k=21"):
        knn(x, 21, engine="faiss")
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        knn(bad, 4, engine="faiss")


@needs_faiss
def test_faiss_cpu_has_no_cuda_support():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss with GPU support is installed")
    assert knn_faiss_module.faiss_available("cpu")
    assert not knn_faiss_module.faiss_available("cuda")
    assert not knn_faiss_module.faiss_available("meta")


def test_missing_faiss(monkeypatch):
    # A None entry in sys.modules makes `import faiss` raise ImportError, as when faiss is not installed.
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert not knn_faiss_module.faiss_available("cpu")
    x = torch.randn(30, 8)
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        knn(x, 3, engine="faiss")
    vals, idx = knn(x, 3)  # engine="auto": ours
    ref_vals, ref_idx = knn_ref(x, x, 3, "ip", "fp32")
    np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
    assert not knn_module._use_faiss("auto", torch.device("cuda"))  # auto never needs faiss


def test_auto_engine_choice(monkeypatch):
    monkeypatch.setattr(knn_faiss_module, "faiss_available", lambda device: True)
    monkeypatch.delenv("VIREID_BACKEND", raising=False)
    assert knn_module._use_faiss("auto", torch.device("cuda"))  # CUDA + faiss-gpu: faiss
    assert not knn_module._use_faiss("auto", torch.device("cpu"))  # CPU: ours
    assert not knn_module._use_faiss("vireid", torch.device("cuda"))
    assert knn_module._use_faiss("faiss", torch.device("cpu"))
    monkeypatch.setenv("VIREID_BACKEND", "triton")  # a forced backend of ours: auto means ours
    assert not knn_module._use_faiss("auto", torch.device("cuda"))


def test_reference_backend_overrides_the_engine(monkeypatch, backend):
    def fail(*args):
        raise AssertionError("VIREID_BACKEND=reference must route to knn_ref")

    monkeypatch.setattr(knn_faiss_module, "knn_faiss", fail)
    monkeypatch.setattr(knn_faiss_module, "faiss_available", lambda device: True)
    backend("reference")
    x = torch.randn(25, 5)
    vals, idx = knn(x, 4, metric="l2", engine="faiss")
    ref_vals, ref_idx = knn_ref(x, x, 4, "l2", "fp32")
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
