"""SALCR: ClusterMemory (cross=), WeightedMemory, knn_graph, agg_feature (CMFP), part_ot, rerank_jaccard."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.compat import literal
from vireid_fast.compat.salcr import (
    ClusterMemory,
    WeightedMemory,
    agg_feature,
    compute_jaccard_distance,
    generate_center,
    knn_graph,
    part_ot,
    rerank_jaccard,
)


@pytest.mark.parametrize("cross", [False, True])
def test_cluster_memory_logits_and_update_order(cross):
    x, t, centres = literal.batch(1)
    memory = ClusterMemory(16, 6, temp=0.05, momentum=0.1)
    assert set(memory.state_dict()) == {"features", "features_avg"}
    memory.features = centres.clone()
    lit = centres.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, t, cross=cross)
    expected = literal.cm(b, t, lit, 0.1, "perm" if cross else "seq") / 0.05
    torch.manual_seed(11)
    F.cross_entropy(out, t).backward()
    torch.manual_seed(11)
    F.cross_entropy(expected, t).backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)
    assert pickle.loads(pickle.dumps(memory)).features.shape == (6, 16)


def test_cross_update_order_matters():
    """Many repeats of one label: the randperm order changes the result, so the test above can tell orders apart."""
    x, _, centres = literal.batch(2)
    t = torch.zeros(24, dtype=torch.int64)
    results = []
    for seed in (1, 2):
        memory = ClusterMemory(16, 6, momentum=0.5)
        memory.features = centres.clone()
        torch.manual_seed(seed)
        memory(x.clone().requires_grad_(), t, cross=True).sum().backward()
        results.append(memory.features[0].clone())
    assert (results[0] - results[1]).abs().max() > 1e-4


def test_weighted_memory():
    x, t, centres = literal.batch(3)
    x = 2 * centres[t] + 0.5 * x  # similarities spread around 0.8: 1.1 x the lowest keeps several members
    memory = WeightedMemory(16, 6, temp=0.05, momentum=0.1)
    memory.features = centres.clone()
    lit = centres.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, t, weight=None)
    xn = F.normalize(b, dim=1).detach()
    sims = (xn * lit[t]).sum(1)
    w = torch.zeros(24)
    for y in t.unique():
        thr = sims[t == y].min().clamp(min=0.0) * 1.1
        w[t == y] = (sims[t == y] <= thr).float()
    assert len(t.unique()) < w.sum() < 24, "some labels must keep more than their least similar member"
    expected = literal.cm(b, t, lit, 0.1, "weighted", w) / 0.05
    F.cross_entropy(out, t).backward()
    F.cross_entropy(expected, t).backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)


def literal_knn_graph(sim, k):
    thr = sim.sort(dim=1, descending=True)[0][:, k - 1]
    graph = (sim >= thr[:, None]).float() * sim
    graph = graph.clamp(min=0)
    return graph / graph.sum(1)[:, None]


def test_knn_graph_and_agg_feature():
    g = torch.Generator().manual_seed(0)
    fv = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    fr = F.normalize(torch.randn(36, 16, generator=g), dim=1)
    torch.testing.assert_close(knn_graph(fv.mm(fr.t()), k=8), literal_knn_graph(fv.mm(fr.t()), 8), atol=1e-6,
                               rtol=0)
    a_dense = torch.cat((torch.cat((literal_knn_graph(fv @ fv.t(), 8), literal_knn_graph(fv @ fr.t(), 8)), 1),
                         torch.cat((literal_knn_graph(fr @ fv.t(), 8), literal_knn_graph(fr @ fr.t(), 8)), 1)), 0)
    expected = F.normalize(a_dense.mm(torch.cat((fv, fr), 0)), dim=1)
    a, feats = agg_feature(fv, fr, k=8)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.to_dense(), a_dense, atol=1e-6, rtol=0)


def literal_center(labels, feats):
    keys = sorted({int(v) for v in labels if int(v) != -1})
    return torch.stack([feats[[i for i in range(len(labels)) if int(labels[i]) == k]].mean(0) for k in keys])


@pytest.mark.parametrize("use_cmfp", [False, True])
def test_part_ot(use_cmfp):
    g = torch.Generator().manual_seed(1)
    n_v, n_r, part_num = 40, 32, 1
    fv_pg = torch.randn(n_v, (part_num + 1) * 2048, generator=g)
    fr_pg = torch.randn(n_r, (part_num + 1) * 2048, generator=g)
    fv_pg[:, 2048:] += 3 * torch.randn(5, 2048, generator=g)[torch.arange(n_v) % 5]
    fr_pg[:, 2048:] += 3 * torch.randn(4, 2048, generator=g)[torch.arange(n_r) % 4]
    l_v = np.r_[np.arange(n_v - 2) % 5, [-1, -1]]
    l_r = np.arange(n_r) % 4
    args = SimpleNamespace(part_num=part_num, CMFP=use_cmfp, k_cmff=6, lambda_ot=5)
    out = part_ot(args, 0, fv_pg, fr_pg, l_v, l_r, torch.zeros(5, 1), torch.zeros(4, 1))
    assert len(out) == 13
    fv, fr = F.normalize(fv_pg[:, 2048:], dim=-1), F.normalize(fr_pg[:, 2048:], dim=-1)
    if use_cmfp:
        fused = agg_feature(fv, fr, k=6)[1]
        fv, fr = F.normalize(fused[:n_v], dim=1), F.normalize(fused[n_v:], dim=1)
    cv, cr = literal_center(l_v, fv), literal_center(l_r, fr)
    q_vr = literal.sinkhorn(literal.sqdist(fv, cr), 5)
    q_rv = literal.sinkhorn(literal.sqdist(fr, cv), 5)
    want = [(fv @ cv.t()).argmax(1), (fr @ cr.t()).argmax(1), q_vr.argmax(1), q_rv.argmax(1)]
    for got, w in zip(out[:4], want, strict=True):
        assert torch.equal(got, w)
    for got, w, k in zip(out[4:8], want, (5, 4, 4, 5), strict=True):
        assert torch.equal(got, literal.one_hot(w, k))
    torch.testing.assert_close(out[12][2], cv, atol=1e-6, rtol=0)
    torch.testing.assert_close(generate_center(l_r, fr), cr, atol=1e-6, rtol=0)


def test_jaccard_imports():
    x = F.normalize(torch.randn(50, 8), dim=1)
    assert compute_jaccard_distance(x, k1=20, k2=6, print_flag=False).shape == (50, 50)
    assert rerank_jaccard(x[:20], x[20:], k1=20, k2=6).shape == (30, 20)
