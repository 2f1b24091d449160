"""The compat Jaccard drop-ins rank like faiss's IndexFlatL2 (exact squared L2): un-normalised features, near-ties,
N == k1 and N < k1, float16, and the op's ``metric=`` keyword."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.compat import literal
from vireid_fast.compat import adca, clustercontrast, hil, mult, pclhd, pgm, salcr
from vireid_fast.ops import kreciprocal_jaccard
from vireid_fast.ops.jaccard import csr_to_dense

DROP_INS = [clustercontrast.compute_jaccard_distance, adca.compute_jaccard_distance, pgm.compute_jaccard_distance,
            pclhd.compute_jaccard_distance, hil.compute_jaccard_distance, mult.compute_jaccard_distance,
            salcr.compute_jaccard_distance]


def unnormalised(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered features with row norms in [0.5, 2] (tie-free: checked below)."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(n // 8 + 1, d))
    x = centres[g.integers(0, len(centres), n)] + 0.6 * g.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= g.uniform(0.5, 2.0, size=(n, 1))
    x = x.astype(np.float32)
    d2 = ((x[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    srt = np.sort(d2, axis=1)
    assert np.diff(srt, axis=1).min() > 1e-6, "test data has near-ties"
    return x


@pytest.mark.parametrize("fn", DROP_INS, ids=lambda f: f.__module__.rsplit(".", 1)[-1])
def test_unnormalised_features_match_the_l2_community_semantics(fn):
    x = unnormalised(72, 12, 0)
    expected = literal.jaccard(x, 20, 6)
    got = fn(torch.from_numpy(x), k1=20, k2=6, print_flag=False)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (72, 72)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_op_metric_keyword():
    x = torch.from_numpy(unnormalised(72, 12, 1))
    l2 = kreciprocal_jaccard(x, 20, 6, metric="l2").numpy()
    ip = kreciprocal_jaccard(x, 20, 6).numpy()
    np.testing.assert_allclose(l2, literal.jaccard(x.numpy(), 20, 6), rtol=0, atol=1e-5)
    assert np.abs(l2 - ip).max() > 0.1, "un-normalised rows: the inner-product order must differ from the L2 one"
    xn = torch.nn.functional.normalize(x, dim=1)  # normalised rows: both orders agree
    np.testing.assert_allclose(kreciprocal_jaccard(xn, 20, 6, metric="l2").numpy(),
                               kreciprocal_jaccard(xn, 20, 6, metric="ip").numpy(), rtol=0, atol=1e-6)
    csr = kreciprocal_jaccard(x, 20, 6, metric="l2", sparse=True)
    dense = csr_to_dense(csr.crow_indices(), csr.col_indices(), csr.values(), 72).numpy()
    np.testing.assert_array_equal(dense, l2)
    with pytest.raises(ValueError, match="metric must be 'ip' or 'l2', got 'cos'"):
        kreciprocal_jaccard(x, 20, 6, metric="cos")


def near_tie_features(seed: int = 3) -> np.ndarray:
    """Early-epoch-like features: groups of 30 near-duplicates (nearest-neighbour cosine ~ 0.99999, more than k1
    per group, so the order decides the k1-neighbour sets), L2-normalised."""
    g = np.random.default_rng(seed)
    base = g.normal(size=(3, 64))
    x = base[np.arange(90) % 3] + 5e-4 * g.normal(size=(90, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def float32_faiss_style_rank(x: np.ndarray, k: int) -> np.ndarray:
    """The order faiss's flat L2 search computes: float32 ||x||^2 + ||y||^2 - 2 x.y."""
    sq = (x * x).sum(1, dtype=np.float32)
    d = sq[:, None] + sq[None, :] - np.float32(2) * (x @ x.T)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_near_ties_follow_the_exact_order():
    x = near_tie_features()
    exact = literal.exact_l2_rank(x, 20)
    rounded = float32_faiss_style_rank(x, 20)
    assert (exact != rounded).any(axis=1).sum() >= 10, "the float32 formula must misorder some rows here"
    got = clustercontrast.compute_jaccard_distance(torch.from_numpy(x), k1=20, k2=6, print_flag=False)
    np.testing.assert_allclose(got, literal.jaccard(x, 20, 6, rank=exact), rtol=0, atol=1e-5)
    # The community result depends on its rounding: with its float32 order the distances move by more than 1e-5.
    assert np.abs(literal.jaccard(x, 20, 6, rank=rounded) - got).max() > 1e-4


def test_n_equal_k1_is_the_community_result_and_n_below_k1_raises():
    x = unnormalised(24, 8, 4)
    got = pgm.compute_jaccard_distance(torch.from_numpy(x), k1=24, k2=6, print_flag=False)
    np.testing.assert_allclose(got, literal.jaccard(x, 24, 6), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"k1=30 needs at least k1 features, got N=24.*pass k1=min\(k1, N\) = 24"):
        pgm.compute_jaccard_distance(torch.from_numpy(x), k1=30, k2=6, print_flag=False)


def test_float16_and_progress_lines(capsys):
    x = unnormalised(72, 12, 5)
    full = adca.compute_jaccard_distance(torch.from_numpy(x), k1=20, k2=6, print_flag=True)
    out = capsys.readouterr().out
    assert "Computing jaccard distance..." in out and "Jaccard distance computing time cost:" in out
    half = adca.compute_jaccard_distance(torch.from_numpy(x), k1=20, k2=6, print_flag=False, use_float16=True)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=0, atol=5e-4)


def test_faiss_misorders_near_ties_and_we_follow_the_exact_order():
    """With faiss installed: its IndexFlatL2 order on 2048-d near-duplicates is not the exact one; ours is."""
    faiss = pytest.importorskip("faiss")
    g = np.random.default_rng(0)
    base = g.normal(size=(3, 2048))
    x = base[np.arange(90) % 3] + 5e-4 * g.normal(size=(90, 2048))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    index = faiss.IndexFlatL2(2048)
    index.add(x)
    _, faiss_rank = index.search(x, 20)
    exact = literal.exact_l2_rank(x, 20)
    assert (faiss_rank != exact).any(axis=1).sum() >= 45
    got = mult.compute_jaccard_distance(torch.from_numpy(x), k1=20, k2=6, print_flag=False)
    np.testing.assert_allclose(got, literal.jaccard(x, 20, 6, rank=exact), rtol=0, atol=1e-5)
    community = literal.jaccard(x, 20, 6, rank=faiss_rank.astype(np.int64))
    assert np.abs(community - got).max() > 1e-3, "faiss's rounding changes the community's distances here"


@pytest.mark.parametrize("name", ["cpp", "reference", "triton"])
def test_metric_l2_on_every_backend(name, backend):
    from vireid_fast import _extension

    if name == "cpp" and not _extension.status()[0]:
        pytest.skip("C++ extension unavailable")
    if name == "triton":
        pytest.importorskip("triton")
    backend(name)
    x = unnormalised(40, 8, 6)  # small: the Triton interpreter is slow
    got = kreciprocal_jaccard(torch.from_numpy(x), 10, 4, metric="l2").numpy()
    np.testing.assert_allclose(got, literal.jaccard(x, 10, 4), rtol=0, atol=1e-5)
