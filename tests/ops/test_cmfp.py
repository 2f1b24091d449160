import numpy as np
import pytest
import torch

import vireid_fast
from vireid_fast.ops import cmfp, cmfp_rerank
from vireid_fast.ops.reference import cmfp_ref


def _features(nv, nr, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(nv + nr, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return x[:nv].contiguous(), x[nv:].contiguous()


def _run(fv, fr, k, backend_name, backend):
    backend(backend_name)
    return cmfp(fv, fr, k, return_affinity=True)


def _assert_same(res, ref, atol):
    prop_v, prop_r, crow, col, val = ref
    torch.testing.assert_close(res.prop_v, prop_v, atol=atol, rtol=0)
    torch.testing.assert_close(res.prop_r, prop_r, atol=atol, rtol=0)
    a = res.affinity
    assert torch.equal(a.crow_indices(), crow)
    assert torch.equal(a.col_indices(), col)
    torch.testing.assert_close(a.values(), val, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["cpp", "reference"])
@pytest.mark.parametrize("k", [8, 30])
def test_golden(golden, backend, name, k):
    g = golden("cmfp.npz")
    backend(name)
    res = cmfp(torch.from_numpy(g["features_v"]), torch.from_numpy(g["features_r"]), k)
    out = torch.cat([res.prop_v, res.prop_r]).numpy()
    np.testing.assert_allclose(out, g[f"k{k}_propagated"], atol=1e-5, rtol=0)


@pytest.mark.triton
def test_golden_triton(golden, backend):
    g = golden("cmfp.npz")
    backend("triton")
    res = cmfp(torch.from_numpy(g["features_v"]), torch.from_numpy(g["features_r"]), 8)
    np.testing.assert_allclose(torch.cat([res.prop_v, res.prop_r]).numpy(), g["k8_propagated"], atol=1e-5, rtol=0)


SHAPES = [(1, 1, 4, 1), (5, 3, 7, 2), (37, 50, 16, 5), (130, 70, 33, 30)]
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-12)]


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_reference(backend, shape, dtype, atol):
    nv, nr, d, k = shape
    fv, fr = _features(nv, nr, d, seed=nv + nr, dtype=dtype)
    _assert_same(_run(fv, fr, k, "cpp", backend), cmfp_ref(fv, fr, k), atol)


def test_cpp_many_panels_and_pruning(backend):
    # more rows than one panel (>= 128) and far more columns than the candidate capacity
    fv, fr = _features(700, 650, 24, seed=3)
    for k in (1, 4, 30):
        _assert_same(_run(fv, fr, k, "cpp", backend), cmfp_ref(fv, fr, k), 1e-5)


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_cpp_propagation_over_several_row_blocks(backend, dtype, atol):
    # The C++ propagation streams the input rows in last-level-cache blocks of 2-8 MB: at d = 2048, 1,600 rows are
    # 13 MB in float32 (26 MB in float64), so rows gather their neighbours across several blocks.
    fv, fr = _features(900, 700, 2048, seed=3, dtype=dtype)
    _assert_same(_run(fv, fr, 6, "cpp", backend), cmfp_ref(fv, fr, 6), atol)


@pytest.mark.triton
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-5)])
@pytest.mark.parametrize("shape", [(1, 1, 4, 1), (5, 3, 7, 2), (37, 100, 20, 9), (140, 30, 33, 30)])
def test_triton_matches_reference(backend, shape, dtype, atol):
    nv, nr, d, k = shape
    fv, fr = _features(nv, nr, d, seed=nv * nr, dtype=dtype)
    _assert_same(_run(fv, fr, k, "triton", backend), cmfp_ref(fv, fr, k), atol)


def _tied_features():
    # entries in {-1, 0, 1}: dot products are small integers, computed exactly by any summation order
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 2, (60, 6), generator=g).float()
    x[x.abs().sum(1) == 0, 0] = 1.0
    return x[:35].contiguous(), x[35:].contiguous()


@pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_ties_are_all_kept(backend, name):
    fv, fr = _tied_features()
    k = 3
    ref = cmfp_ref(fv, fr, k)
    res = _run(fv, fr, k, name, backend)
    _assert_same(res, ref, 1e-6)
    counts = res.affinity.crow_indices().diff()
    assert int(counts.max()) > 2 * k  # some rows keep more than k per block through ties


@pytest.mark.parametrize("nr, prototypes", [(1024, 10), (1024, 40), (700, 40)])
def test_cpp_large_ties_bf16_search(backend, nr, prototypes):
    # (Nv+Nr)^2 d >= 2^30 at nr=1024: the bf16 candidate search, with the cross blocks in one two-way sweep. Rows are
    # copies of {-1, 0, 1} prototypes: every score is an integer, exact in fp32 and bf16 alike, and each row has
    # ~25 (40 prototypes) or ~100 (10: more than the bf16 pool of 70) exact ties at its threshold, so rows are
    # rescanned for ties, or their pools overflow and they are redone by the fp32 pass.
    g = torch.Generator().manual_seed(3)
    protos = torch.randint(-1, 2, (prototypes, 256), generator=g).float()
    fv = protos[torch.randint(0, prototypes, (1024,), generator=g)].contiguous()
    fr = protos[torch.randint(0, prototypes, (nr,), generator=g)].contiguous()
    _assert_same(_run(fv, fr, 5, "cpp", backend), cmfp_ref(fv, fr, 5), 1e-5)


@pytest.mark.parametrize("name", ["cpp", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_block_without_positive_similarity(backend, name):
    # every visible-infrared similarity is negative: the cross blocks contribute nothing (the community code: NaN)
    fv = torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.3, 0.1], [1.0, 0.0, 0.4]])
    fr = torch.tensor([[-1.0, 0.1, 0.0], [-1.0, 0.0, -0.2]])
    fv, fr = torch.nn.functional.normalize(fv, dim=1), torch.nn.functional.normalize(fr, dim=1)
    res = _run(fv, fr, 2, name, backend)
    assert torch.isfinite(res.prop_v).all() and torch.isfinite(res.prop_r).all()
    dense = res.affinity.to_dense()
    assert (dense[:3, 3:] == 0).all() and (dense[3:, :3] == 0).all()
    torch.testing.assert_close(dense[:3, :3].sum(1), torch.ones(3))
    intra_only = torch.nn.functional.normalize(dense[:3, :3] @ fv, dim=1)
    torch.testing.assert_close(res.prop_v, intra_only, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cpp", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_zero_feature_row_gives_zero_output(backend, name):
    fv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    fr = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    res = _run(fv, fr, 2, name, backend)
    assert (res.prop_v[0] == 0).all()
    assert torch.isfinite(res.prop_v).all()


def test_affinity_rows_sum_to_one_per_block(backend):
    fv, fr = _features(40, 25, 8, seed=11)
    backend("cpp")
    dense = cmfp(fv, fr, 5, return_affinity=True).affinity.to_dense()
    torch.testing.assert_close(dense[:, :40].sum(1), torch.ones(65), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense[:, 40:].sum(1), torch.ones(65), atol=1e-6, rtol=0)
    assert cmfp(fv, fr, 5).affinity is None


def test_half_precision_inputs(backend):
    fv, fr = _features(20, 30, 8, seed=2)
    backend("cpp")
    res = cmfp(fv.bfloat16(), fr.bfloat16(), 4)
    assert res.prop_v.dtype == torch.bfloat16
    ref = cmfp_ref(fv.bfloat16().float(), fr.bfloat16().float(), 4)
    torch.testing.assert_close(res.prop_v.float(), ref[0], atol=1e-2, rtol=0)


def test_rerank_distance(backend):
    q, g = _features(15, 40, 12, seed=9)
    backend("cpp")
    dist = cmfp_rerank(q, g, 5)
    pq, pg, *_ = cmfp_ref(q, g, 5)
    expected = ((pq[:, None, :] - pg[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(dist, expected, atol=1e-5, rtol=0)
    assert dist.shape == (15, 40) and (dist >= 0).all()


@pytest.mark.parametrize("args, err, match", [
    (lambda fv, fr: (fv, fr, 0), ValueError, "k must be in"),
    (lambda fv, fr: (fv, fr, 6), ValueError, "k must be in"),
    (lambda fv, fr: (fv, fr, 2.0), TypeError, "k must be an int"),
    (lambda fv, fr: (fv, fr[:, :3], 2), ValueError, "feature dimension"),
    (lambda fv, fr: (fv[0], fr, 2), ValueError, "2-D"),
    (lambda fv, fr: (fv.long(), fr, 2), TypeError, "dtype"),
    (lambda fv, fr: (fv[:0], fr, 1), ValueError, "empty"),
    (lambda fv, fr: (fv.masked_fill(fv > 0.5, float("nan")), fr, 2), ValueError, "NaN"),
])
def test_bad_inputs(args, err, match):
    fv, fr = _features(8, 5, 4)
    with pytest.raises(err, match=match):
        cmfp(*args(fv, fr))


def test_raw_op_checks_sizes():
    fv, fr = _features(8, 5, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(N_v, N_r\)\] = \[1, 5\]"):
        torch.ops.vireid.cmfp(fv, fr, 9)
    if vireid_fast.backends()["cpp"]["available"]:  # the C++ twin behind the validation layer refuses it too
        with pytest.raises(RuntimeError, match="k must be"):
            torch.ops.vireid._cmfp_cpu(fv, fr, 9)


def test_opcheck():
    fv, fr = _features(12, 9, 5)
    torch.library.opcheck(torch.ops.vireid.cmfp.default, (fv, fr, 3))


@pytest.mark.triton
def test_triton_large_k_falls_back_to_reference(backend, monkeypatch):
    from vireid_fast.kernels import cmfp as triton_cmfp

    monkeypatch.setattr(triton_cmfp, "MAX_K", 2)
    fv, fr = _features(9, 7, 5, seed=4)
    with pytest.warns(RuntimeWarning, match="k <= 2"):
        res = _run(fv, fr, 3, "triton", backend)
    _assert_same(res, cmfp_ref(fv, fr, 3), 1e-6)
