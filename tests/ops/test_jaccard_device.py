"""Device-side k-reciprocal Jaccard (kernels/kreciprocal_jaccard.py ``launch``, the CUDA route), run here on CPU
tensors: vs the C++ op and the reference over random clustered data with exact ties, modality variants, forced small
work blocks, the public function under VIREID_BACKEND=triton, and the goldens."""

import numpy as np
import pytest
import torch
from vireid_fast.kernels import kreciprocal_jaccard as device_kernel

import vireid_fast  # noqa: F401
from tests.golden_utils import golden_dense
from vireid_fast.ops import _registry, knn, kreciprocal_jaccard
from vireid_fast.ops.jaccard import csr_to_dense
from vireid_fast.ops.reference import kreciprocal_jaccard_ref
from vireid_fast.ops.sparse import SparseDistance


def clustered_with_duplicates(n, d, seed):
    """L2-normalised identities x samples; every fifth row repeats the row before it (exact kNN ties)."""
    gen = torch.Generator().manual_seed(seed)
    ids = max(1, n // 8)
    centres = torch.randn(ids, d, generator=gen)
    x = centres[torch.randint(0, ids, (n,), generator=gen)] + 0.7 * torch.randn(n, d, generator=gen)
    x[5::5] = x[4:-1:5][: x[5::5].shape[0]]
    return torch.nn.functional.normalize(x, dim=1)


def modality_of(kind, n, seed):
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(n, dtype=torch.long)
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))


def assert_same_csr(got, expected, atol=1e-6):
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int64 and got[2].dtype == torch.float32
    assert torch.equal(got[0], expected[0]), "row pointers differ"
    assert torch.equal(got[1], expected[1]), "column indices differ"
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=atol)


CASES = sorted({(n, k1, k2) for n in (2, 7, 50, 300) for k1 in (1, 2, 5, 20) if k1 < n
                for k2 in (1, 3, k1) if k2 <= k1})


@pytest.mark.parametrize("n, k1, k2", CASES)
@pytest.mark.parametrize("mod_kind", ["none", "mixed", "ones"])
def test_launch_matches_cpp_and_reference(n, k1, k2, mod_kind):
    feats = clustered_with_duplicates(n, 12, seed=n * 100 + k1)
    modality = modality_of(mod_kind, n, seed=k2)
    sim, rank = knn(feats, k1, metric="ip")
    for rank_sim in (sim, None):
        got = device_kernel.launch(feats, rank, rank_sim, k2, modality)
        assert_same_csr(got, torch.ops.vireid.kreciprocal_jaccard(feats, rank, rank_sim, k2, modality))
        cols_sorted = all(bool((got[1][a:b].diff() > 0).all()) for a, b in zip(got[0][:-1], got[0][1:], strict=True))
        assert cols_sorted and bool((got[2] < 1).all()) and bool((got[2] >= 0).all())
        if n <= 50 or (rank_sim is sim and mod_kind != "ones"):  # the dense reference is slow at N = 300
            assert_same_csr(got, kreciprocal_jaccard_ref(feats, rank, rank_sim, k2, modality))


def test_result_is_symmetric_with_zero_diagonal():
    feats = clustered_with_duplicates(120, 16, seed=3)
    sim, rank = knn(feats, 10, metric="ip")
    crow, col, values = device_kernel.launch(feats, rank, sim, 4, None)
    dense = csr_to_dense(crow, col, values, 120)
    assert torch.equal(dense, dense.T)
    assert bool((torch.diagonal(dense) < 1e-6).all())


@pytest.mark.parametrize("int32_keys, dense_ratio", [(2**31 - 1, 0), (0, 0), (2**31 - 1, 1 << 30)])
def test_small_work_blocks_give_the_same_result(monkeypatch, int32_keys, dense_ratio):
    """Many row chunks (single rows above the block size), several dot-product and expansion blocks; int32 or int64
    sort keys; min-sum by sorted keys (ratio 0) or by the dense chunk accumulator."""
    feats = clustered_with_duplicates(300, 12, seed=11)
    modality = modality_of("mixed", 300, seed=2)
    sim, rank = knn(feats, 20, metric="ip")
    expected = torch.ops.vireid.kreciprocal_jaccard(feats, rank, None, 6, modality)
    monkeypatch.setattr(device_kernel, "_BLOCK", 1000)
    monkeypatch.setattr(device_kernel, "_INT32_KEYS", int32_keys)
    monkeypatch.setattr(device_kernel, "_DENSE_RATIO", dense_ratio)
    assert_same_csr(device_kernel.launch(feats, rank, None, 6, modality), expected)


@pytest.mark.parametrize("k1, k2, mod_kind", [(5, 3, "none"), (12, 12, "mixed"), (2, 1, "ones")])
def test_public_function_routes_to_device_path(backend, monkeypatch, k1, k2, mod_kind):
    """VIREID_BACKEND=triton: the kNN runs in the Triton interpreter (slow, hence N=40), then the device path."""
    feats = clustered_with_duplicates(40, 8, seed=k1 + k2)
    modality = modality_of(mod_kind, 40, seed=5)
    calls, launch = [], device_kernel.launch

    def spy(*args):
        calls.append(args)
        return launch(*args)

    monkeypatch.setattr(device_kernel, "launch", spy)
    backend("triton")
    got = kreciprocal_jaccard(feats, k1, k2, sparse=True, modality=modality)
    assert len(calls) == 1 and isinstance(got, SparseDistance) and got.shape == (40, 40)
    backend("cpp")
    expected = kreciprocal_jaccard(feats, k1, k2, sparse=True, modality=modality)
    assert_same_csr((got.crow_indices(), got.col_indices(), got.values()),
                    (expected.crow_indices(), expected.col_indices(), expected.values()))


@pytest.mark.parametrize("k1, k2", [(20, 6), (30, 6), (30, 1)])
def test_golden(golden, k1, k2):
    g = golden("jaccard.npz")
    feats = torch.from_numpy(g["features"])
    sim, rank = knn(feats, k1, metric="ip")
    crow, col, values = device_kernel.launch(feats, rank, sim, k2, None)
    dense = csr_to_dense(crow, col, values, feats.shape[0]).numpy()
    expected = golden_dense(g, k1, k2)
    np.testing.assert_array_equal(dense < 1, expected < 1)  # same support
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, own, layer", [
    ("rank_range", r"initial_rank entries must be in \[0, N\)", (ValueError, r"initial_rank must lie in \[0, 10\)")),
    ("rank_dtype", "initial_rank must be \\(N, k1\\) int64", (TypeError, "initial_rank must have dtype int64")),
    ("k2", "1 <= k2 <= k1 \\(N=10, k1=4, k2=5\\)", (ValueError, "k2=5 must be <= k1=4")),
    ("rank_sim", "rank_sim must be \\(N, k1\\) float32", (ValueError, "rank_sim must have initial_rank's shape")),
    ("modality", "modality must be \\(N,\\) int64", (ValueError, r"modality must be \(N,\) = \(10,\)")),
    ("features", "features must be \\(N, d\\) float32", (TypeError, "features must have dtype float32")),
])
def test_bad_inputs(change, own, layer):
    feats = clustered_with_duplicates(10, 4, seed=0)
    sim, rank = knn(feats, 4, metric="ip")
    args = dict(features=feats, initial_rank=rank, rank_sim=sim, k2=2, modality=None)
    args |= {"rank_range": dict(initial_rank=rank.clone().fill_(10)), "rank_dtype": dict(initial_rank=rank.int()),
             "k2": dict(k2=5), "rank_sim": dict(rank_sim=sim[:, :3]), "features": dict(features=feats.double()),
             "modality": dict(modality=torch.zeros(9, dtype=torch.long))}[change]
    with pytest.raises(ValueError, match=own):  # the kernel's own guard
        device_kernel.launch(**args)
    # ... and the op's validation layer in front of it (what torch.ops.vireid.kreciprocal_jaccard runs on CUDA)
    with pytest.raises(layer[0], match=layer[1]):
        _registry.checked("kreciprocal_jaccard", device_kernel.launch)(*args.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    feats = clustered_with_duplicates(300, 32, seed=4)
    modality = modality_of("mixed", 300, seed=4)
    sim, rank = knn(feats, 20, metric="ip")
    expected = torch.ops.vireid.kreciprocal_jaccard(feats, rank, sim, 6, modality)
    got = torch.ops.vireid.kreciprocal_jaccard(feats.cuda(), rank.cuda(), sim.cuda(), 6, modality.cuda())
    assert all(t.is_cuda for t in got)
    assert_same_csr(tuple(t.cpu() for t in got), expected)
