"""k-reciprocal Jaccard distance: goldens (community output), C++ vs the reference on random clustered data (plain
and modality-invariant), sparse == dense, bad inputs, opcheck."""

import numpy as np
import pytest
import torch

import vireid_fast  # noqa: F401
from tests.golden_utils import golden_dense
from vireid_fast.ops import knn, kreciprocal_jaccard
from vireid_fast.ops.reference import kreciprocal_jaccard_ref
from vireid_fast.ops.sparse import SparseDistance

SETTINGS = [(20, 6), (30, 6), (30, 1)]


def clustered(n, d, ids, seed, spread=0.6):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, d, generator=gen)
    x = centres[torch.arange(n) % ids] + spread * torch.randn(n, d, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("k1, k2", SETTINGS)
def test_golden_dense_and_sparse(golden, backend, k1, k2):
    g = golden("jaccard.npz")
    backend("cpp")
    feats = torch.from_numpy(g["features"])
    dense = kreciprocal_jaccard(feats, k1, k2)
    expected = golden_dense(g, k1, k2)
    assert dense.dtype == torch.float32 and dense.shape == expected.shape
    np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(dense.numpy() < 1, expected < 1)  # same support
    sparse = kreciprocal_jaccard(feats, k1, k2, sparse=True)
    assert isinstance(sparse, SparseDistance) and sparse.fill == 1.0
    assert bool((sparse.values() < 1).all())
    as_dense = torch.ones(sparse.shape)
    rows = torch.repeat_interleave(torch.arange(sparse.shape[0]), sparse.crow_indices().diff())
    as_dense[rows, sparse.col_indices()] = sparse.values()
    assert torch.equal(as_dense, dense)


@pytest.mark.slow
def test_golden_reference(golden, backend):
    g = golden("jaccard.npz")
    backend("reference")
    dense = kreciprocal_jaccard(torch.from_numpy(g["features"]), 30, 6)
    np.testing.assert_allclose(dense.numpy(), golden_dense(g, 30, 6), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, d, ids, k1, k2", [
    (2, 3, 1, 1, 1),
    (31, 8, 5, 6, 3),
    (90, 16, 9, 20, 6),
    (120, 12, 30, 25, 25),  # k1 = 25: round_half_even(12.5) = 12; k2 = k1
    (101, 32, 7, 40, 32),   # PCLHD stage 2 setting
])
def test_cpp_matches_reference(n, d, ids, k1, k2):
    feats = clustered(n, d, ids, seed=n + k1)
    sim, rank = knn(feats, k1, metric="ip")
    for rank_sim in (None, sim):
        got = torch.ops.vireid.kreciprocal_jaccard(feats, rank, rank_sim, k2, None)
        ref = kreciprocal_jaccard_ref(feats, rank, rank_sim, k2, None)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[2], ref[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k2", [1, 3, 6])
def test_modality_invariant_matches_reference(k2):
    n = 80
    feats = clustered(n, 16, 8, seed=k2)
    modality = (torch.arange(n) % 3 == 0).long()
    modality[:7] = 1  # some rows see one modality only among their k2 neighbours
    sim, rank = knn(feats, 12, metric="ip")
    got = torch.ops.vireid.kreciprocal_jaccard(feats, rank, sim, k2, modality)
    ref = kreciprocal_jaccard_ref(feats, rank, sim, k2, modality)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=1e-6)
    plain = torch.ops.vireid.kreciprocal_jaccard(feats, rank, sim, k2, None)
    if k2 == 1:  # no query expansion: modality plays no role
        assert torch.equal(plain[2], got[2])
    else:
        assert not (plain[0].equal(got[0]) and plain[2].equal(got[2]))


def test_modality_one_modality_equals_plain():
    feats = clustered(60, 8, 6, seed=5)
    plain = kreciprocal_jaccard(feats, 10, 4)
    same = kreciprocal_jaccard(feats, 10, 4, modality=torch.zeros(60, dtype=torch.long))
    torch.testing.assert_close(plain, same, rtol=0, atol=1e-6)


def test_public_backends_agree(backend):
    feats = clustered(50, 8, 5, seed=9)
    backend("reference")
    ref = kreciprocal_jaccard(feats, 8, 3)
    backend("cpp")
    got = kreciprocal_jaccard(feats, 8, 3)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert torch.allclose(torch.diagonal(got), torch.zeros(50), atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k1=10), ValueError, "k1=10 must be smaller than the number of features N=10"),   # k1 >= N
    (dict(k1=0), ValueError, "k1 must be >= 1, got 0"),
    (dict(k1=4, k2=5), ValueError, "k2=5 must be <= k1=4"),
    (dict(k2=0), ValueError, "k2 must be >= 1, got 0"),
    (dict(features=torch.randn(10)), ValueError, r"features must be 2-D, got shape \(10,\)"),
    (dict(features=torch.randn(0, 4)), ValueError, "features is empty"),
    (dict(features=torch.full((10, 4), float("nan"))), ValueError, "features contains NaN or Inf"),
    (dict(modality=torch.zeros(9, dtype=torch.long)), ValueError, r"modality must be an \(N,\)=10 integer tensor"),
    (dict(modality=torch.full((10,), 2)), ValueError, r"modality must lie in \[0, 2\), got values in \[2, 2\]"),
    (dict(modality=torch.zeros(10)), ValueError, "modality must be an .* integer tensor of 0/1, got .*float32"),
    (dict(features=[[1.0, 0.0]] * 10), TypeError, "features must be a torch.Tensor, got list"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(features=torch.nn.functional.normalize(torch.randn(10, 4), dim=1), k1=5, k2=2) | kwargs
    with pytest.raises(error, match=match):
        kreciprocal_jaccard(args.pop("features"), args.pop("k1"), args.pop("k2"), **args)


def test_opcheck():
    feats = clustered(40, 8, 4, seed=1)
    sim, rank = knn(feats, 6, metric="ip")
    torch.library.opcheck(torch.ops.vireid.kreciprocal_jaccard.default, (feats, rank, None, 3, None))
    torch.library.opcheck(torch.ops.vireid.kreciprocal_jaccard.default,
                          (feats, rank, sim, 3, (torch.arange(40) % 2).long()))
