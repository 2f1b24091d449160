import numpy as np
import pytest
import torch

from vireid_fast.eval import kreciprocal


def literal_rerank(q_g, q_q, g_g, k1, k2, lam):
    """The algorithm step by step with Python loops (ties-free inputs), float32 like the common implementation."""
    nq = q_g.shape[0]
    dist = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0)
    dist = (dist ** 2).astype(np.float32)
    dist = (dist / dist.max(axis=0)).T
    n = dist.shape[0]
    order = np.argsort(dist, axis=1, kind="stable")

    def recip(i, width):
        fwd = order[i, :width]
        return [j for j in fwd if i in order[j, :width]]

    kh = int(np.around(k1 / 2.0))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        a = recip(i, k1 + 1)
        expansion = list(a)
        for c in a:
            h = recip(c, kh + 1)
            if len(set(h) & set(a)) > 2.0 / 3.0 * len(h):
                expansion += h
        members = np.unique(expansion)
        w = np.exp(-dist[i, members])
        v[i, members] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[order[i, :k2]].mean(0) for i in range(n)]).astype(np.float32)
    out = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):
        s = np.minimum(v[i][None, :], v).sum(1)
        out[i] = 1 - s / (2 - s)
    final = out * (1 - lam) + dist[:nq] * lam
    return final[:, nq:]


def _dists(nq, ng, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    q = centres[rng.integers(0, 6, nq)] + 0.7 * rng.standard_normal((nq, d))
    g = centres[rng.integers(0, 6, ng)] + 0.7 * rng.standard_normal((ng, d))
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).astype(np.float32)
    return dist(q, g), dist(q, q), dist(g, g)


@pytest.mark.parametrize("nq, ng, k1, k2, lam", [(12, 30, 20, 6, 0.3), (25, 40, 8, 3, 0.5), (5, 9, 4, 1, 0.0),
                                                 (40, 35, 10, 6, 1.0)])
def test_matches_literal(nq, ng, k1, k2, lam):
    q_g, q_q, g_g = _dists(nq, ng, 8, seed=nq * ng)
    ours = kreciprocal(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    expected = literal_rerank(q_g, q_q, g_g, k1, k2, lam)
    assert ours.shape == (nq, ng) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-6, rtol=0)


def test_chunked_equals_unchunked(monkeypatch):
    import vireid_fast.eval.rerank as rr

    q_g, q_q, g_g = _dists(30, 50, 6, seed=1)
    full = kreciprocal(q_g, q_q, g_g, k1=10, k2=4)
    monkeypatch.setattr(rr, "_CHUNK_ELEMENTS", 500)
    torch.testing.assert_close(kreciprocal(q_g, q_q, g_g, k1=10, k2=4), full, atol=1e-6, rtol=0)


def test_bad_inputs():
    q_g, q_q, g_g = _dists(4, 6, 3, seed=2)
    with pytest.raises(ValueError, match="q_q"):
        kreciprocal(q_g, q_q[:3, :3], g_g)
    with pytest.raises(ValueError, match="k1"):
        kreciprocal(q_g, q_q, g_g, k1=10)
    with pytest.raises(ValueError, match="NaN"):
        kreciprocal(np.full_like(q_g, np.nan), q_q, g_g, k1=3)
    with pytest.raises(ValueError, match="empty"):
        kreciprocal(q_g[:, :0], q_q, g_g[:0, :0], k1=3)
    with pytest.raises(ValueError, match="lambda"):
        kreciprocal(q_g, q_q, g_g, k1=3, k2=2, lambda_value=2.0)
