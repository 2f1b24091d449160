"""MULT: the label transfer against the spec's worked numbers (mult.md §10 T1-T7) and literal dense versions, the loss
terms against their equations, the memory-call order, the term plan by parity and ablation, the sampler, and a short
run through the engine."""

import contextlib
import io
import math
import types

import pytest
import torch
import torch.nn.functional as F

from vireid_fast.methods.mult import MEMORY_SPACE, mode_plan, mult_batches, oclr_term, soft_cross_entropy
from vireid_fast.methods.mult_transfer import (
    HeteroAffinity,
    homogeneous_affinity,
    kreciprocal_set_affinity,
    mult_association,
    propagate,
    raw_centroids,
    soft_labels,
)
from vireid_fast.ops import dbscan, kreciprocal_jaccard, sinkhorn
from vireid_fast.ops.sparse import SparseDistance


def clustered(n, k, d=16, noise=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return F.normalize(c[torch.arange(n) % k] + noise * torch.randn(n, d, generator=g), dim=1)


def dense_plan(ot: HeteroAffinity, cost: torch.Tensor) -> torch.Tensor:
    return torch.exp(ot.f[:, None] + ot.g[None, :] - ot.lam * cost.double())


# ------------------------------------------------------------------------------------------------ Sinkhorn (T1, T2)
def test_community_sinkhorn_two_by_two_stops_after_one_step():
    # x, y chosen so that ||x_i - y_j||^2 = C = [[0, 1], [1, 0]]
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = x.clone()
    ot = HeteroAffinity(x, y, 1.0).solve(stop="community")
    assert ot.n_iter == 1 and ot.err == pytest.approx(0.0, abs=1e-12)
    kernel = torch.tensor([[1.0, math.exp(-1)], [math.exp(-1), 1.0]], dtype=torch.float64)
    plan = dense_plan(ot, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(plan, kernel / (2 * (1 + math.exp(-1))))


def literal_community_sinkhorn(cost, lam, max_iter=500):
    """The official solver's rule written out in the linear domain (float64)."""
    k = torch.exp(-lam * cost.double())
    n, m = k.shape
    beta = torch.full((m, 1), 1.0 / m, dtype=torch.float64)
    err, step = 1e6, 0
    while err > 0.1 and step < max_iter:
        alpha = (1.0 / n) / (k @ beta)
        beta_new = (1.0 / m) / (k.t() @ alpha)
        if step % 10 == 0:
            terms = (beta / beta_new - 1).abs()
            err = float(terms[torch.isfinite(terms)].sum())
        beta = beta_new
        step += 1
    return alpha * k * beta.t(), step


@pytest.mark.parametrize("shape", [(6, 3), (50, 5), (200, 30)])
def test_community_sinkhorn_matches_literal_and_streams(shape):
    n, m = shape
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 8, generator=g) * 0.3, torch.randn(m, 8, generator=g) * 0.3
    cost = torch.cdist(x.double(), y.double()) ** 2
    plan, steps = literal_community_sinkhorn(cost, 4.0)
    ot = HeteroAffinity(x.double(), y.double(), 4.0).solve(stop="community")
    assert ot.n_iter == steps and (steps == 500 or steps % 10 == 1)
    torch.testing.assert_close(dense_plan(ot, cost), plan, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(plan.sum(0), torch.full((m,), 1.0 / m, dtype=torch.float64))
    streamed = HeteroAffinity(x.double(), y.double(), 4.0, block_bytes=8 * m * 3, cache_bytes=0).solve()
    assert streamed.rows == 3 and streamed.n_iter == steps
    torch.testing.assert_close(streamed.f, ot.f)
    torch.testing.assert_close(streamed.g, ot.g)


def test_tol_stop_is_the_project_sinkhorn():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=g) * 0.4, torch.randn(25, 6, generator=g) * 0.4
    ot = HeteroAffinity(x.double(), y.double(), 3.0, block_bytes=8 * 25 * 7).solve(stop="tol", max_iter=1000,
                                                                                   tol=1e-8)
    cost = torch.cdist(x.double(), y.double()) ** 2
    plan, info = sinkhorn(cost, 3.0, max_iter=1000, tol=1e-8, return_info=True)
    assert ot.n_iter == int(info.n_iter[0])
    torch.testing.assert_close(dense_plan(ot, cost), plan, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("lam", [25.0, 2000.0])
def test_one_exponential_sweep_equals_the_two_log_sum_exps(lam):
    # lam = 2000: exp(-lam * gap) underflows in the row softmax for the far column, so the sweep falls back
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.05], [1.0, 1.0]], dtype=torch.float64)
    ot = HeteroAffinity(x, y, lam)
    g = torch.tensor([0.3, -0.2], dtype=torch.float64)
    lse_rows, f, lse_cols = ot._sweep(g)
    torch.testing.assert_close(lse_rows, ot._row_lse(g), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, -math.log(3) - ot._row_lse(g), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_cols, ot._col_lse(f), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(lse_cols).all())


@pytest.mark.parametrize("cache", [True, False])
def test_affinities_are_row_softmaxes_of_the_plan(cache):
    fv, fr = clustered(23, 4), clustered(17, 4, seed=1)
    ot = HeteroAffinity(fv, fr, 25.0, block_bytes=8 * 17 * 3, cache_bytes=(1 << 20) if cache else 0).solve()
    assert (ot._cache is not None) == cache
    cost = torch.cdist(fv.double(), fr.double()) ** 2
    plan = dense_plan(ot, cost)
    h_vr, h_rv = plan / plan.sum(1, keepdim=True), plan.t() / plan.t().sum(1, keepdim=True)
    torch.testing.assert_close(ot.vr(torch.eye(17)), h_vr.float(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ot.rv(torch.eye(23)), h_rv.float(), atol=2e-6, rtol=1e-5)
    assert torch.equal(ot.row_argmax(), plan.argmax(1))
    torch.testing.assert_close(ot.row_softmax(), h_vr.float(), atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ transfer (T3, T4, T5)
def identity_sparse(n):
    return torch.eye(n).to_sparse()


HALF = (lambda z: z.mean(0, keepdim=True).expand_as(z).clone())  # H = all 1/2 for N = 2


def test_one_transfer_step_gauss_seidel_and_jacobi():
    y0 = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    yh0 = torch.eye(2)
    y, yh, it, delta = propagate(y0, yh0, identity_sparse(2), identity_sparse(2), HALF, HALF, alpha=0.2, max_iter=1)
    torch.testing.assert_close(y, torch.tensor([[0.56, 0.44], [0.46, 0.54]]))
    torch.testing.assert_close(yh, torch.tensor([[0.608, 0.392], [0.408, 0.592]]))
    assert it == 1 and delta == pytest.approx(0.8)
    _, yh, _, _ = propagate(y0, yh0, identity_sparse(2), identity_sparse(2), HALF, HALF, alpha=0.2, max_iter=1,
                            order="jacobi")
    torch.testing.assert_close(yh, torch.tensor([[0.64, 0.36], [0.44, 0.56]]))


def test_smoothing_and_stop_rules():
    a = torch.full((2, 2), 0.5).to_sparse()
    y, _, it, delta = propagate(torch.eye(2), torch.eye(2), a, identity_sparse(2), HALF, HALF, alpha=1.0, max_iter=1)
    torch.testing.assert_close(y, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    y0 = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    y, yh, it, delta = propagate(y0, torch.eye(2), identity_sparse(2), identity_sparse(2), HALF, HALF, alpha=1.0)
    assert it == 1 and delta == 0.0 and torch.equal(y, y0)
    # the cap: a path graph with self-loops, labels of the other side swapped, alpha = 0.01
    n = 20
    path = torch.eye(n) + torch.diag(torch.ones(n - 1), 1) + torch.diag(torch.ones(n - 1), -1)
    path = (path / path.sum(1, keepdim=True)).to_sparse()
    onehot = F.one_hot((torch.arange(n) >= n // 2).long(), 2).float()
    ident = (lambda z: z.clone())
    _, _, it, delta = propagate(onehot, onehot.flip(1), path, path, ident, ident, alpha=0.01)
    assert it == 20 and delta == pytest.approx(0.0145, abs=5e-4)


def test_soft_labels_invariants_and_ties():
    y = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.3, 0.6]])
    hard, soft = soft_labels(y, 0.7)
    assert hard.tolist() == [0, 2]  # tie -> first index
    torch.testing.assert_close(soft, 0.7 * F.one_hot(hard, 3).float() + 0.3 * y)
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    assert torch.equal(soft_labels(y, 1.0)[1], F.one_hot(hard, 3).float())
    torch.testing.assert_close(soft_labels(y, 0.0)[1], y)


# ------------------------------------------------------------------------------------------ homogeneous affinities
def test_homogeneous_affinity_is_row_normalised_one_minus_jaccard():
    f = clustered(30, 4)
    dist = kreciprocal_jaccard(f, 8, 3, sparse=True)
    a = homogeneous_affinity(dist).to_dense().double()
    s = 1 - dist.to_dense().double()
    s.fill_diagonal_(1.0)
    torch.testing.assert_close(a, s / s.sum(1, keepdim=True), atol=1e-7, rtol=1e-6)
    # a row whose distance lacks the diagonal entry still gets its self-loop
    crow, col, vals = torch.tensor([0, 1, 1]), torch.tensor([1]), torch.tensor([0.5])
    a2 = homogeneous_affinity(SparseDistance(crow, col, vals, 2, fill=1.0)).to_dense()
    torch.testing.assert_close(a2, torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))


def test_kreciprocal_set_affinity_matches_literal_sets():
    f = clustered(25, 3, seed=4)
    k = 5
    a = kreciprocal_set_affinity(f, k).to_dense().double()
    sims = f.double() @ f.double().t()
    near = [torch.sort(-sims[i], stable=True).indices[:k + 1].tolist() for i in range(25)]
    recip = [{j for j in near[i] if i in near[j]} for i in range(25)]
    s = torch.tensor([[len(recip[i] & recip[j]) / len(recip[i] | recip[j]) for j in range(25)] for i in range(25)],
                     dtype=torch.float64)
    assert torch.all(s.diagonal() == 1)
    torch.testing.assert_close(a, s / s.sum(1, keepdim=True), atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------ end to end (T7)
def literal_mult(fv, fr, cv, cr, dv, dr, alpha=0.2):
    """Dense float64 MULT of spec §4 with the literal community Sinkhorn."""
    fv, fr, cv, cr = fv.double(), fr.double(), cv.double(), cr.double()
    y_v0 = torch.softmax(fv @ cv.t() / 0.05, 1)
    y_r0 = torch.softmax(fr @ cr.t() / 0.05, 1)
    yh_r0 = F.one_hot(literal_community_sinkhorn(torch.cdist(fr, cv) ** 2, 25)[0].argmax(1), cv.shape[0]).double()
    yh_v0 = F.one_hot(literal_community_sinkhorn(torch.cdist(fv, cr) ** 2, 25)[0].argmax(1), cr.shape[0]).double()
    plan, _ = literal_community_sinkhorn(torch.cdist(fv, fr) ** 2, 25)
    h_vr, h_rv = plan / plan.sum(1, keepdim=True), plan.t() / plan.t().sum(1, keepdim=True)
    a_v, a_r = 1 - dv.double(), 1 - dr.double()
    a_v.fill_diagonal_(1)
    a_r.fill_diagonal_(1)
    a_v, a_r = a_v / a_v.sum(1, keepdim=True), a_r / a_r.sum(1, keepdim=True)

    def run(y0, yh0, a_own, a_oth, h_own, h_oth):
        y, yh, delta, it = y0, yh0, math.inf, 0
        while delta > 0.01 and it < 20:
            py, pyh = y, yh
            y = (1 - alpha) * h_own @ yh + alpha * y0
            yh = (1 - alpha) * h_oth @ y + alpha * yh0
            y = 0.5 * a_own @ y + 0.5 * y
            yh = 0.5 * a_oth @ yh + 0.5 * yh
            delta = max(float((yh - pyh).abs().sum() / pyh.sum()), float((y - py).abs().sum() / py.sum()))
            it += 1
        return y, yh

    y_v, yh_r = run(y_v0, yh_r0, a_v, a_r, h_vr, h_rv)
    y_r, yh_v = run(y_r0, yh_v0, a_r, a_v, h_rv, h_vr)
    return y_v, yh_r, y_r, yh_v


def test_mult_transfer_matches_literal_and_community_with_outliers_and_unequal_clusters():
    from vireid_fast.compat import mult as community

    fv, fr = clustered(60, 7, noise=0.3), clustered(40, 5, seed=1, noise=0.3)
    dv, dr = kreciprocal_jaccard(fv, 10, 4, sparse=True), kreciprocal_jaccard(fr, 10, 4, sparse=True)
    lv, lr = dbscan(dv, 0.5, 3), dbscan(dr, 0.5, 3)
    assert int((lv < 0).sum()) == 11 and (int(lv.max()), int(lr.max())) == (4, 5)  # outliers; more infrared clusters
    res = mult_association(fv, fr, lv, lr, homogeneous_affinity(dv), homogeneous_affinity(dr), cache_bytes=0,
                           block_bytes=8 * 40 * 7)
    literal = literal_mult(fv, fr, raw_centroids(fv, lv), raw_centroids(fr, lr), dv.to_dense(), dr.to_dense())
    for got, want in zip((res.y_v, res.yh_r, res.y_r, res.yh_v), literal, strict=True):
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
        assert torch.equal(got.argmax(1), want.argmax(1))
        torch.testing.assert_close(got.sum(1), torch.ones(got.shape[0]))
    with contextlib.redirect_stdout(io.StringIO()):
        out = community.MULT(types.SimpleNamespace(alpha=0.2), 0, fv, fr, lv, lr, raw_centroids(fv, lv),
                             raw_centroids(fr, lr), dv.to_dense(), dr.to_dense())
    for got, want in zip((res.y_v, res.y_r, res.yh_v, res.yh_r), out[6:], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="labels_r has no cluster"):
        mult_association(fv, fr, lv, torch.full_like(lr, -1), homogeneous_affinity(dv), homogeneous_affinity(dr))


# ------------------------------------------------------------------------------------------ losses (T8, T9)
def test_soft_cross_entropy_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(soft_cross_entropy(z, F.one_hot(labels, 4).double()), F.cross_entropy(z, labels))
    y = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1)
    loss = soft_cross_entropy(z, y)
    p = torch.softmax(z.detach(), 1)
    literal = -sum(float(y[i, c]) * math.log(float(p[i, c])) for i in range(5) for c in range(4)) / 5
    assert float(loss.detach()) == pytest.approx(literal, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(z.grad, (torch.softmax(z, 1) - y).detach() / 5)


def test_oclr_sharpened_target_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    zp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = oclr_term(zp, zt, 0.2)
    t = torch.softmax(zt.detach() * 5, 1)
    literal = -sum(float(t[i, c]) * math.log(float(torch.softmax(zp[i].detach(), 0)[c]))
                   for i in range(3) for c in range(4)) / 3
    assert float(loss.detach()) == pytest.approx(literal, rel=1e-12)
    loss.backward()
    assert zt.grad is not None and float(zt.grad.abs().sum()) > 0  # the code does not detach the target
    zt.grad = None
    oclr_term(zp, zt, 0.2, detach=True).backward()
    assert zt.grad is None


# ------------------------------------------------------------------------------------------ term plan (T11)
def test_term_plan_by_parity():
    calls, terms = mode_plan("V")
    assert [t[0] for t in terms] == ["IM1", "IM2", "IM3", "IM4", "CM1", "CM2", "CM3", "O1", "O2", "O3", "O4", "O5",
                                     "O6"]
    assert calls == [("memory_v", "vis"), ("memory_v", "aug"), ("memory_rcm", "ir"), ("memory_r", "ir"),
                     ("memory_va", "vis"), ("memory_va", "aug"), ("memory_va", "ir")]
    oclr = {t[0]: (t[2], t[3]) for t in terms if t[1] == "oclr"}
    assert oclr["O1"] == (("memory_va", "vis"), ("memory_v", "aug", True))  # crossed streams, target = IM2 logits
    assert oclr["O4"] == (("memory_va", "vis"), ("memory_rcm", "aug", False))  # fixed target
    assert oclr["O6"] == (("memory_va", "ir"), ("memory_v", "ir", False))
    calls, terms = mode_plan("R")
    assert len(terms) == 14 and len(calls) == 8
    oclr = {t[0]: (t[2], t[3]) for t in terms if t[1] == "oclr"}
    assert oclr["O1"] == (("memory_ra", "vis"), ("memory_vcm", "aug", True))
    assert oclr["O3"] == (("memory_ra", "ir"), ("memory_r", "ir", True))
    assert oclr["O6"] == (("memory_ra", "ir"), ("memory_vcm", "ir", False))
    _, terms = mode_plan("V", cross_stream=False)
    assert {t[0]: t[3] for t in terms}["O1"] == ("memory_v", "vis", True)
    calls, terms = mode_plan("V", visible_streams=1)
    assert [t[0] for t in terms] == ["IM1", "IM3", "IM4", "CM1", "CM3", "O1", "O3", "O4", "O6"]
    assert {t[0]: t[3] for t in terms}["O1"] == ("memory_v", "vis", True) and all(s != "aug" for _, s in calls)


ABLATIONS = {  # Table 2 rows 2-7: (use_im, use_cm, use_oclr)
    "cm": (False, True, False), "im+cm": (True, True, False), "oclr": (False, False, True),
    "im+oclr": (True, False, True), "cm+oclr": (False, True, True), "full": (True, True, True),
}


@pytest.mark.parametrize("row", list(ABLATIONS))
@pytest.mark.parametrize("mode", ["V", "R"])
def test_ablation_rows_remove_exactly_their_groups(row, mode):
    im, cm, oclr = ABLATIONS[row]
    _, full_terms = mode_plan(mode)
    calls, terms = mode_plan(mode, use_im=im, use_cm=cm, use_oclr=oclr)
    keep = {"I": im, "C": cm, "O": oclr}
    assert [t[0] for t in terms] == [t[0] for t in full_terms if keep[t[0][0]]]
    shared = "memory_va" if mode == "V" else "memory_ra"
    # M^a is called (hence updated) iff CM or OCLR is on; the intra memories only if a term reads their logits
    assert any(c[0] == shared for c in calls) == (cm or oclr)
    used = {t[2] for t in terms} | {t[3][:2] for t in terms if t[1] == "oclr" and t[3][2]}
    assert set(calls) == used


# ------------------------------------------------------------------------------------------ sampler (T12)
def test_sampler_blocks_labels_and_replacement():
    g = torch.Generator().manual_seed(0)
    vis = {"V": torch.tensor([0] * 6 + [1] * 2 + [2] * 3 + [3] * 5), "R": torch.tensor([0, 1] * 8)}
    ir = {"V": torch.tensor([0] * 3 + [1] * 4 + [4] * 5), "R": torch.tensor([1] * 7 + [0] * 4 + [5])}
    out = mult_batches(vis, ir, num_labels=4, num_pos=4, iters=30, generator=g)
    assert out is not None
    for vb, ib in zip(*out, strict=True):
        assert len(vb) == len(ib) == 16
        blocks = [(vb[4 * b: 4 * b + 4], ib[4 * b: 4 * b + 4]) for b in range(4)]
        v_labels = [int(vis["V"][v[0]]) for v, _ in blocks[:2]]
        r_labels = [int(ir["R"][i[0]]) for _, i in blocks[2:]]
        assert len(set(v_labels)) == 2 and set(v_labels) <= {0, 1} and len(set(r_labels)) == 2
        for b, (v, i) in enumerate(blocks):
            space = "V" if b < 2 else "R"
            label = int(vis[space][v[0]])
            assert all(int(vis[space][x]) == label for x in v) and all(int(ir[space][x]) == label for x in i)
            if label == 0 and space == "V":  # 6 visible members > 4: without replacement
                assert len(set(v)) == 4
    # groups of exactly num_pos are drawn with replacement (the official rule): a repeat shows up
    repeats = any(len(set(i[8:12])) < 4 or len(set(i[12:16])) < 4 for i in out[1])
    assert repeats
    empty = {"V": torch.tensor([0, 0]), "R": torch.tensor([1, 1])}
    assert mult_batches(empty, {"V": torch.tensor([1]), "R": torch.tensor([0])}, 4, 2, 3, g) is None


# ------------------------------------------------------------------------------------------ the method (T10, T13)
from vireid_fast.config import load_config  # noqa: E402
from vireid_fast.methods import MULT, TrainBatch, get_method  # noqa: E402
from vireid_fast.models import small_resnet  # noqa: E402

from .context import make_context  # noqa: E402


def make_method(*overrides, name="mult"):
    torch.manual_seed(0)
    model = small_resnet(widths=(8, 8, 8, 16))
    config = load_config(None, [f"method.name={name}", "method.stage_one_epochs=1", "train.num_identities=2",
                                "train.num_instances=2", "train.iters=3", "cluster.k1=6", "cluster.k2=3",
                                "cluster.eps=0.6", "cluster.min_samples=3", *overrides])
    return get_method(name)(config.method, make_context(model, config))


def prepared(method, epoch):
    fv, fr = clustered(36, 4, seed=2), clustered(30, 3, seed=3)
    feats = {"visible": {"feature": fv}, "infrared": {"feature": fr}}
    method.start_epoch(epoch)
    labels = method.pseudo_label(feats)
    method.build_memories(feats, labels)
    return feats, labels


def test_memories_are_the_dbscan_centroids_and_every_instance_is_labelled():
    method = make_method()
    feats, labels = prepared(method, 2)
    db = method.db_labels
    assert bool((db["visible"] < 0).any() or (db["infrared"] < 0).any())
    assert bool((labels["visible"] >= 0).all()) and bool((labels["infrared"] >= 0).all())
    for name, m in (("memory_v", "visible"), ("memory_va", "visible"), ("memory_rcm", "visible"),
                    ("memory_r", "infrared"), ("memory_ra", "infrared"), ("memory_vcm", "infrared")):
        want = F.normalize(raw_centroids(feats[m]["feature"], db[m]), dim=1)
        torch.testing.assert_close(getattr(method, name), want)
    linked_v, linked_r = method.shared_label_spaces(labels)[""]
    assert torch.equal(linked_v, method.hard_v) and torch.equal(linked_r, method.hardx_r)
    assert method.soft_v.shape == (36, int(db["visible"].max()) + 1)
    assert method.softx_r.shape == (30, int(db["visible"].max()) + 1)
    torch.testing.assert_close(method.soft_v.sum(1), torch.ones(36))
    assert torch.equal(method.hard_v, method.soft_v.argmax(1))


def test_stage_two_without_clusters_in_one_modality_skips_the_epoch():
    method = make_method("cluster.eps=0.01")
    logged = []
    method.ctx.log = lambda msg, *a, **k: logged.append(msg)
    feats, labels = prepared(method, 2)
    assert bool((labels["visible"] < 0).all())
    assert method.batch_sampler(labels, 2) is None and "no visible" in logged[-1] and "cluster.eps" in logged[-1]


def run_step(method, memory_grad_check=True):
    """One stage-2 step on random features standing for the three streams; returns features, losses, memories before."""
    g = torch.Generator().manual_seed(7)
    feats = {s: torch.randn(6, 16, generator=g, dtype=torch.float32, requires_grad=True) for s in ("vis", "aug", "ir")}
    idx_v, idx_r = torch.randint(36, (6,), generator=g), torch.randint(30, (6,), generator=g)
    before = {name: getattr(method, name).clone() for name in MEMORY_SPACE}
    losses = method.stage_two_losses(feats, idx_v, idx_r)
    return feats, idx_v, idx_r, losses, before


def literal_step(method, feats, idx_v, idx_r, before, snapshot=False):
    """The losses with plain tensors, then the gradient w.r.t. every stream and the memories after the step, simulated
    call by call in reverse call order (each call's input gradient with the memory as it is then, then its update)."""
    p = method.params
    calls, terms = mode_plan(method.mode, use_im=p.use_im, use_cm=p.use_cm, use_oclr=p.use_oclr)
    index = {"vis": idx_v, "aug": idx_v, "ir": idx_r}
    xhat = {s: F.normalize(f.detach(), dim=1) for s, f in feats.items()}
    z = {c: (xhat[c[1]] @ before[c[0]].t() / p.temp).requires_grad_() for c in calls}
    fixed = {}
    total = 0
    for _tid, kind, key, target in terms:
        _, soft = method._labels(key[1], MEMORY_SPACE[key[0]], index[key[1]])
        if kind == "ce":
            total = total + soft_cross_entropy(z[key], soft)
        else:
            tkey = target[:2]
            if target[2]:
                zt = z[tkey]
            else:
                zt = fixed.setdefault(tkey, (xhat[tkey[1]] @ before[tkey[0]].t() / p.temp).requires_grad_())
            total = total + oclr_term(z[key], zt, p.oclr_sharpen)
    total.backward()
    memories = {name: t.clone() for name, t in before.items()}
    grad_xhat = {s: torch.zeros_like(x) for s, x in xhat.items()}
    for key, zt in fixed.items():
        grad_xhat[key[1]] += zt.grad @ before[key[0]] / p.temp
    for memory, stream in reversed(calls):
        m = before[memory] if snapshot else memories[memory]
        grad_xhat[stream] += z[(memory, stream)].grad @ m / p.temp
        hard, _ = method._labels(stream, MEMORY_SPACE[memory], index[stream])
        mu = p.momentum_cross if memory in ("memory_va", "memory_ra") else p.momentum
        for x, y in zip(xhat[stream], hard.tolist(), strict=True):
            memories[memory][y] = F.normalize(mu * memories[memory][y] + (1 - mu) * x, dim=0)
    grads = {}
    for s, f in feats.items():
        fd = f.detach().clone().requires_grad_()
        F.normalize(fd, dim=1).backward(grad_xhat[s])
        grads[s] = fd.grad
    return float(total.detach()), grads, memories


@pytest.mark.parametrize("epoch", [2, 3])
@pytest.mark.parametrize("memory_grad", ["live", "snapshot"])
def test_step_losses_gradients_and_update_order_match_literal(epoch, memory_grad):
    method = make_method(f"method.memory_grad={memory_grad}")
    prepared(method, epoch)
    assert method.mode == ("V" if epoch % 2 == 0 else "R")
    feats, idx_v, idx_r, losses, before = run_step(method)
    assert len(losses) == (13 if epoch % 2 == 0 else 14)
    sum(losses.values()).backward()
    total, grads, memories = literal_step(method, feats, idx_v, idx_r, before, snapshot=memory_grad == "snapshot")
    assert float(sum(losses.values()).detach()) == pytest.approx(total, rel=1e-5)
    for s in feats:
        torch.testing.assert_close(feats[s].grad, grads[s], atol=1e-5, rtol=1e-4)
    for name in MEMORY_SPACE:
        torch.testing.assert_close(getattr(method, name), memories[name], atol=1e-6, rtol=1e-5)
    unused = ("memory_ra", "memory_vcm") if method.mode == "V" else ("memory_va", "memory_rcm")
    for name in unused:
        assert torch.equal(getattr(method, name), before[name])


def test_ablation_leaves_memories_without_enabled_terms_untouched():
    method = make_method("method.use_cm=false", "method.use_oclr=false")
    prepared(method, 2)
    feats, idx_v, idx_r, losses, before = run_step(method)
    assert set(losses) == {"IM1", "IM2", "IM3", "IM4"}
    sum(losses.values()).backward()
    assert torch.equal(method.memory_va, before["memory_va"])
    assert not torch.equal(method.memory_v, before["memory_v"])
    method = make_method("method.use_cm=false", "method.use_im=false")
    prepared(method, 2)
    feats, idx_v, idx_r, losses, before = run_step(method)
    sum(losses.values()).backward()
    assert not torch.equal(method.memory_va, before["memory_va"])  # the OCLR predictions are M^a's logits


def test_stage_one_is_dcl_on_dbscan_labels():
    method = make_method("method.stage_one_epochs=5")
    feats, labels = prepared(method, 0)
    assert method.stage == 1 and torch.equal(labels["visible"], method.db_labels["visible"])
    assert method.shared_label_spaces(labels) == {}
    assert method.memory_va is None
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8)
    yv = torch.tensor([0, 0, 1, -1])
    losses = method.training_step(TrainBatch(images, yv, torch.arange(4), images, torch.tensor([0, 1, 1, 0]),
                                             torch.arange(4)))
    assert set(losses) == {"visible", "augmented", "infrared"}
    paper = make_method("method.stage_one_epochs=5", name="mult_paper")
    prepared(paper, 0)
    losses = paper.training_step(TrainBatch(images, yv, torch.arange(4), images, torch.tensor([0, 1, 1, 0]),
                                            torch.arange(4)))
    assert set(losses) == {"visible", "augmented", "infrared"}  # one visible stream is a stage-2 switch (Q7)
    vis_only = {"vis": torch.randn(4, 16), "ir": torch.randn(4, 16)}
    with torch.no_grad():
        torch.testing.assert_close(
            method.stage_one_losses({**vis_only, "aug": vis_only["vis"]}, yv, torch.tensor([0, 1, 1, 0]))["visible"],
            literal_memory_ce(vis_only["vis"][:3], yv[:3], method.memory_v))


def literal_memory_ce(f, y, memory, temp=0.05):
    return F.cross_entropy(F.normalize(f, dim=1) @ memory.t() / temp, y)


def test_paper_preset_keys():
    p = make_method(name="mult_paper").params
    assert (p.homog_affinity, p.init_label_centroids, p.cross_init, p.lp_order, p.sinkhorn_stop,
            p.visible_streams, p.oclr_detach_target, p.memory_grad) == (
        "hard_kreciprocal", "normalized", "soft_plan", "jacobi", "tol", 1, True, "snapshot")
    assert isinstance(make_method(name="mult_paper"), MULT)


# ------------------------------------------------------------------------------------------ in the engine
from tests.engine.tiny import assert_same_state, resume_after_kill, tiny_config, tiny_root  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_root(tmp_path_factory)


@pytest.mark.parametrize("name", ["mult", "mult_paper"])
def test_trains_in_the_engine(tiny, tmp_path, name):
    import json

    from vireid_fast.engine.trainer import Trainer

    overrides = (f"method.name={name}", "method.stage_one_epochs=1", "eval.eval_untrained=false", "cluster.eps=0.8",
                 "train.epochs=3")
    trainer = Trainer(tiny_config(str(tmp_path / "run"), *overrides), data_root=tiny, log=lambda *a, **k: None,
                      progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "stage" in r]
    assert [r["stage"] for r in rows] == [1.0, 2.0, 2.0]
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    terms = [sorted(k for k in r if k.startswith("loss/") and k != "loss/total") for r in rows[1:]]
    if name == "mult":
        assert [len(t) for t in terms] == [14, 13]  # epoch 1 (odd) R-mode, epoch 2 (even) V-mode
    assert rows[1]["lp_iter/v_space"] >= 1 and rows[1]["ot_iter/instances"] >= 1
    assert "xmod/precision" not in rows[0] and 0.0 <= rows[1]["xmod/precision"] <= 1.0  # the transfer's pairs


def test_resumes_bit_exact_after_a_kill_in_stage_two(tiny, tmp_path, monkeypatch):
    from vireid_fast.engine.trainer import Trainer

    def quiet(*args, **kwargs):
        pass

    overrides = ("method.name=mult", "method.stage_one_epochs=1", "eval.eval_untrained=false", "cluster.eps=0.8",
                 "train.epochs=3")
    full = Trainer(tiny_config(str(tmp_path / "full"), *overrides), data_root=tiny, log=quiet, progress=False)
    full.fit()
    resumed = resume_after_kill(tiny, str(tmp_path / "killed"), overrides, 2, monkeypatch, quiet)
    resumed.fit()
    assert_same_state((full.encoder, resumed.encoder), (full.method, resumed.method))


def test_two_bn_groups_follow_the_dataparallel_split():
    import copy

    method = make_method("method.bn_groups=2")
    model = method.ctx.model
    model.train()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    vis_img = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8, generator=g)
    ir_img = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8, generator=g)
    batch = TrainBatch(vis_img, torch.zeros(4, dtype=torch.long), torch.arange(4), ir_img,
                       torch.zeros(4, dtype=torch.long), torch.arange(4))
    feats = method.encode(batch)
    aug = method.ctx.augment
    x_vis, x_aug, x_ir = aug["train"](vis_img), aug["channel"](vis_img), aug["train"](ir_img)
    mod = torch.tensor([0] * 4 + [1] * 2)
    second = copy.deepcopy(reference)
    out_a = reference(torch.cat([x_vis, x_ir[:2]]), mod)
    out_b = second(torch.cat([x_aug, x_ir[2:]]), mod)
    torch.testing.assert_close(feats["vis"], out_a[:4])
    torch.testing.assert_close(feats["aug"], out_b[:4])
    torch.testing.assert_close(feats["ir"], torch.cat([out_a[4:], out_b[4:]]))
    for key, value in reference.state_dict().items():  # running statistics of the first group only
        torch.testing.assert_close(model.state_dict()[key], value)
    one = make_method()
    one.ctx.model.train()
    joint = one.encode(batch)
    assert not torch.allclose(joint["vis"], feats["vis"])  # one group: statistics over all 12 images
