"""DBSCAN: label for label against scikit-learn on dense and CSR inputs (border points between clusters, all noise,
one cluster, eps >= 1 with the sparse fill), the reference too; bad inputs; opcheck."""

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN

import vireid_fast  # noqa: F401
from vireid_fast.ops import dbscan
from vireid_fast.ops.reference import dbscan_csr_ref, dbscan_dense_ref


def sklearn_labels(dense: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)


def to_csr(dense: np.ndarray, fill: float = 1.0) -> torch.Tensor:
    """CSR of the entries != fill (the Jaccard sparse form)."""
    t = torch.from_numpy(dense)
    mask = t != fill
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    col = torch.nonzero(mask)[:, 1]
    return torch.sparse_csr_tensor(crow, col, t[mask], t.shape, check_invariants=True)


def random_jaccard_like(n: int, seed: int, symmetric: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.random((n, n)).astype(np.float32)
    d[rng.random((n, n)) < 0.6] = 1.0  # most pairs are exactly 1, as in the Jaccard distance
    if symmetric:
        d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0.0)
    return d


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps, min_samples", [(0.1, 2), (0.3, 4), (0.6, 4), (0.6, 12), (1.0, 4), (1.2, 3)])
def test_matches_sklearn(backend, seed, eps, min_samples):
    dense = random_jaccard_like(37 + 11 * seed, seed, symmetric=seed % 3 != 0)
    expected = sklearn_labels(dense, eps, min_samples)
    backend("cpp")
    np.testing.assert_array_equal(dbscan(torch.from_numpy(dense), eps, min_samples).numpy(), expected)
    np.testing.assert_array_equal(dbscan(to_csr(dense), eps, min_samples, fill=1.0).numpy(), expected)
    np.testing.assert_array_equal(dbscan(torch.from_numpy(dense).double(), eps, min_samples).numpy(), expected)


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_sklearn(backend, seed):
    dense = random_jaccard_like(30, seed, symmetric=seed != 1)
    for eps, ms in [(0.3, 3), (0.6, 4), (1.0, 5)]:
        expected = sklearn_labels(dense, eps, ms)
        np.testing.assert_array_equal(dbscan_dense_ref(torch.from_numpy(dense), eps, ms).numpy(), expected)
        csr = to_csr(dense)
        got = dbscan_csr_ref(csr.crow_indices(), csr.col_indices(), csr.values(), eps, ms, 1.0)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_border_point_joins_the_lower_numbered_cluster(backend):
    # Core groups {0,1,2,3} and {5,6,7,8}; point 4 is within eps of 3 and of 5 but has only 3 neighbours.
    n = 9
    d = np.ones((n, n), dtype=np.float32)
    for group in ([0, 1, 2, 3], [5, 6, 7, 8]):
        for a in group:
            for b in group:
                d[a, b] = 0.0 if a == b else 0.1
    d[4, 4] = 0.0
    d[3, 4] = d[4, 3] = 0.2
    d[4, 5] = d[5, 4] = 0.2
    expected = sklearn_labels(d, 0.3, 4)
    assert list(expected) == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    backend("cpp")
    assert dbscan(torch.from_numpy(d), 0.3, 4).tolist() == list(expected)
    assert dbscan(to_csr(d), 0.3, 4, fill=1.0).tolist() == list(expected)
    # Reorder so that the other group is numbered first: the border point follows the lower number.
    perm = [5, 6, 7, 8, 4, 0, 1, 2, 3]
    dp = d[np.ix_(perm, perm)]
    expected = sklearn_labels(dp, 0.3, 4)
    assert list(expected) == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert dbscan(to_csr(dp), 0.3, 4, fill=1.0).tolist() == list(expected)
    # And with the border point first in index order.
    perm = [4, 0, 1, 2, 3, 5, 6, 7, 8]
    dp = d[np.ix_(perm, perm)]
    assert dbscan(to_csr(dp), 0.3, 4, fill=1.0).tolist() == list(sklearn_labels(dp, 0.3, 4))


def test_all_noise_and_one_cluster(backend):
    backend("cpp")
    d = random_jaccard_like(25, 4)
    assert (dbscan(to_csr(d), 1e-7, 2, fill=1.0) == -1).all()
    assert (sklearn_labels(d, 1e-7, 2) == -1).all()
    assert (dbscan(to_csr(d), 1.0, 2, fill=1.0) == 0).all()
    one = np.full((5, 5), 0.2, dtype=np.float32)
    assert dbscan(torch.from_numpy(one), 0.5, 5).tolist() == [0] * 5


def test_single_point_and_missing_diagonal(backend):
    backend("cpp")
    assert dbscan(torch.zeros(1, 1), 0.5, 1).tolist() == [0]
    assert dbscan(torch.zeros(1, 1), 0.5, 2).tolist() == [-1]
    # A CSR without its diagonal: the diagonal is the fill (1.0), so a point is not its own neighbour for eps < 1.
    d = np.array([[1.0, 0.1], [0.1, 1.0]], dtype=np.float32)
    assert dbscan(to_csr(d), 0.5, 2, fill=1.0).tolist() == list(sklearn_labels(d, 0.5, 2))
    assert dbscan(to_csr(d), 0.5, 1, fill=1.0).tolist() == list(sklearn_labels(d, 0.5, 1))


def test_eps_compared_in_float32_like_sklearn(backend):
    backend("cpp")
    eps = 0.6
    just_above = np.nextafter(np.float32(eps), np.float32(2))
    d = np.array([[0, np.float32(eps), just_above], [np.float32(eps), 0, 1], [just_above, 1, 0]], dtype=np.float32)
    for ms in (1, 2, 3):
        expected = sklearn_labels(d, eps, ms)
        assert dbscan(torch.from_numpy(d), eps, ms).tolist() == list(expected)
        assert dbscan(to_csr(d), eps, ms, fill=1.0).tolist() == list(expected)


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3), 0.5, 2), ValueError, r"dist must be 2-D, got shape \(3,\)"),
    ((torch.zeros(3, 4), 0.5, 2), ValueError, r"dist must be square \(N, N\), got shape \(3, 4\)"),
    ((torch.zeros(0, 0), 0.5, 2), ValueError, "dist is empty"),
    ((torch.zeros(3, 3), 0.0, 2), ValueError, "eps must be a finite number > 0, got 0.0"),
    ((torch.zeros(3, 3), float("inf"), 2), ValueError, "eps must be a finite number > 0, got inf"),
    ((torch.zeros(3, 3), 0.5, 0), ValueError, "min_samples must be >= 1, got 0"),
    ((torch.full((3, 3), float("nan")), 0.5, 2), ValueError, "dist contains NaN or Inf"),
    ((np.zeros((3, 3)), 0.5, 2), TypeError, "dist must be a torch.Tensor .* got ndarray"),
    ((torch.zeros(3, 3, dtype=torch.int64), 0.5, 2), TypeError, "dist must have dtype float32.*got int64"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        dbscan(*args)


def test_duplicate_csr_entries_are_rejected(backend):
    backend("cpp")
    crow = torch.tensor([0, 2, 3])
    col = torch.tensor([1, 1, 0])
    dup = torch.sparse_csr_tensor(crow, col, torch.tensor([0.1, 0.2, 0.1]), (2, 2))
    with pytest.raises(ValueError, match=r"duplicate entries in row 0 \(column 1\); coalesce"):
        dbscan(dup, 0.5, 1, fill=1.0)


def test_opcheck():
    d = torch.from_numpy(random_jaccard_like(20, 1))
    csr = to_csr(d.numpy())
    torch.library.opcheck(torch.ops.vireid.dbscan_dense.default, (d, 0.5, 3))
    torch.library.opcheck(torch.ops.vireid.dbscan_csr.default,
                          (csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone(), 0.5, 3, 1.0))
