import numpy as np
import pytest
import torch

from vireid_fast.eval import evaluate

from .literal import literal_eval


def _case(seed, num_q, num_g, num_ids, *, ties=False, absent=0):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids + absent, num_q)  # pids >= num_ids never occur in the gallery
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.choice([3, 6], num_q)
    g_cams = rng.choice([1, 2, 4, 5], num_g)
    if ties:
        dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)  # many exact ties
    else:
        dist = rng.standard_normal((num_q, num_g)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


CASES = [
    dict(seed=0, num_q=50, num_g=40, num_ids=8),
    dict(seed=1, num_q=30, num_g=7, num_ids=3),  # gallery smaller than max_rank
    dict(seed=2, num_q=60, num_g=50, num_ids=10, ties=True),
    dict(seed=3, num_q=40, num_g=30, num_ids=6, absent=4),  # queries with no true match
    dict(seed=4, num_q=1, num_g=1, num_ids=1),
    dict(seed=5, num_q=25, num_g=100, num_ids=40, ties=True, absent=3),
]


@pytest.mark.parametrize("protocol", ["sysu", "regdb"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [1 << 22, 37])
def test_evaluate_matches_literal_loop(case, protocol, chunk):
    dist, qp, gp, qc, gc = _case(**case)
    if case["num_q"] == 1:
        qc = np.array([6])
    cmc_rep, cmc_std, m_ap, m_inp, ap, inp = literal_eval(dist, qp, gp, qc, gc, protocol)
    res = evaluate(dist, qp, gp, qc, gc, protocol=protocol, chunk_elements=chunk)
    np.testing.assert_allclose(res.reported_cmc, cmc_rep, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.cmc, cmc_std, rtol=0, atol=1e-12)
    assert res.mAP == pytest.approx(m_ap, abs=1e-12)
    assert res.mINP == pytest.approx(m_inp, abs=1e-12)
    np.testing.assert_allclose(res.ap, ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.inp, inp, rtol=0, atol=1e-12)
    assert res.max_rank == min(20, case["num_g"])
    assert len(res.cmc) == res.max_rank


def test_ties_ranked_by_gallery_index():
    dist = np.zeros((1, 4), dtype=np.float32)
    res = evaluate(dist, [7], [1, 7, 2, 7], [6], [1, 1, 1, 1], protocol="sysu", max_rank=4)
    # ranked order is gallery order: the hits are at ranks 2 and 4
    assert res.ap[0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res.inp[0] == pytest.approx(2 / 4)
    np.testing.assert_array_equal(res.cmc, [0, 1, 1, 1])
    # de-duplicated identities: 1, 7, 2 -> the query's identity is second
    np.testing.assert_array_equal(res.cmc_unique, [0, 1, 1, 1])


def test_sysu_camera_removal_and_unique_cmc():
    # query from camera 3: every camera-2 gallery item is dropped, whatever its identity
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    g_pids = np.array([5, 4, 4, 9, 5])
    g_cams = np.array([2, 1, 4, 5, 1])
    res = evaluate(dist, [5], g_pids, [3], g_cams, protocol="sysu", max_rank=4)
    # kept: 4, 4, 9, 5 -> standard first hit at rank 4; identities 4, 9, 5 -> unique rank 3
    np.testing.assert_array_equal(res.cmc, [0, 0, 0, 1])
    np.testing.assert_array_equal(res.cmc_unique, [0, 0, 1, 1])
    assert res.ap[0] == pytest.approx(1 / 4)
    # the same query from camera 6 keeps everything
    res6 = evaluate(dist, [5], g_pids, [6], g_cams, protocol="sysu", max_rank=4)
    assert res6.rank1 == 1.0
    assert res6.ap[0] == pytest.approx((1 + 2 / 5) / 2)


def test_torch_inputs_and_float64():
    dist, qp, gp, qc, gc = _case(0, 20, 30, 5)
    a = evaluate(dist, qp, gp, qc, gc)
    b = evaluate(torch.from_numpy(dist).double(), torch.from_numpy(qp), torch.from_numpy(gp), torch.from_numpy(qc),
                 torch.from_numpy(gc))
    np.testing.assert_array_equal(a.cmc_unique, b.cmc_unique)
    assert a.mAP == b.mAP


@pytest.mark.parametrize("mutate, match", [
    (lambda d, qp, gp: (d[:, :0], qp, gp[:0]), "empty"),
    (lambda d, qp, gp: (np.where(np.eye(*d.shape, dtype=bool), np.nan, d), qp, gp), "NaN"),
    (lambda d, qp, gp: (d, qp[:-1], gp), "q_pids"),
    (lambda d, qp, gp: (d, qp, gp[:-1]), "g_pids"),
    (lambda d, qp, gp: (d[0], qp, gp), "2-D"),
    (lambda d, qp, gp: (d, qp + 1000, gp), "no query has a true match"),
])
def test_bad_inputs(mutate, match):
    dist, qp, gp, _, _ = _case(0, 10, 12, 3)
    d, q, g = mutate(dist, qp, gp)
    with pytest.raises(ValueError, match=match):
        evaluate(d, q, g, protocol="regdb")


def test_bad_protocol_arguments():
    dist, qp, gp, qc, gc = _case(0, 10, 12, 3)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(dist, qp, gp, qc, gc, protocol="market")
    with pytest.raises(ValueError, match="camids"):
        evaluate(dist, qp, gp, protocol="sysu")
    with pytest.raises(ValueError, match="q_camids"):
        evaluate(dist, qp, gp, qc[:-1], gc, protocol="sysu")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(dist, qp, gp, qc, gc, max_rank=0)
    with pytest.raises(TypeError):
        evaluate("not an array", qp, gp, qc, gc)


def test_result_json_roundtrip(tmp_path):
    import json

    dist, qp, gp, qc, gc = _case(3, 20, 30, 5, absent=2)
    res = evaluate(dist, qp, gp, qc, gc)
    text = res.to_json(tmp_path / "r.json", per_query=True)
    data = json.loads(text)
    assert data["rank1"] == res.rank1 and data["mAP"] == res.mAP
    assert data["num_valid_query"] == res.num_valid
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert sum(v is None for v in data["ap"]) == len(qp) - res.num_valid
