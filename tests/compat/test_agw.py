import numpy as np
import pytest

from vireid_fast.compat.agw import eval_regdb, eval_sysu


def test_eval_sysu_golden(golden):
    g = golden("eval.npz")
    cmc, m_ap, m_inp = eval_sysu(g["distmat"], g["q_pids"], g["g_pids"], g["q_camids"], g["g_camids"])
    assert cmc.dtype == np.float32 and cmc.shape == g["sysu_cmc"].shape
    np.testing.assert_allclose(cmc, g["sysu_cmc"], rtol=0, atol=1e-6)
    assert isinstance(m_ap, np.floating) and isinstance(m_inp, np.floating)
    assert abs(m_ap - g["sysu_mAP"]) <= 1e-6
    assert abs(m_inp - g["sysu_mINP"]) <= 1e-6


def test_eval_regdb_golden(golden):
    g = golden("eval.npz")
    cmc, m_ap, m_inp = eval_regdb(g["distmat"], g["q_pids"], g["g_pids"])
    assert cmc.dtype == np.float32 and cmc.shape == g["regdb_cmc"].shape
    np.testing.assert_allclose(cmc, g["regdb_cmc"], rtol=0, atol=1e-6)
    assert abs(m_ap - g["regdb_mAP"]) <= 1e-6
    assert abs(m_inp - g["regdb_mINP"]) <= 1e-6


def test_keyword_signature_and_small_gallery(golden):
    g = golden("eval.npz")
    cmc, _, _ = eval_sysu(distmat=g["distmat"][:, :5], q_pids=g["q_pids"], g_pids=g["g_pids"][:5],
                          q_camids=g["q_camids"], g_camids=g["g_camids"][:5], max_rank=20)
    assert len(cmc) <= 5
    cmc, _, _ = eval_regdb(g["distmat"], g["q_pids"], g["g_pids"], max_rank=10)
    assert len(cmc) == 10


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no query"):
        eval_regdb(np.zeros((2, 3)), np.array([1, 2]), np.array([3, 4, 5]))
