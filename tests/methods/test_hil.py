"""HIL: the spec's §10 worked numbers, every loss term against a literal per-row implementation (values and
gradients), memory update rules and order, BRST against a literal loop, the batched K-means against scikit-learn,
the schedule, the ablation switches and short runs in the engine."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.methods.context import make_context
from vireid_fast.config import load_config
from vireid_fast.methods import TrainBatch
from vireid_fast.methods import hil as hil_module
from vireid_fast.methods.hil import (
    HIL,
    brst,
    mccl_inverse_distance,
    mccl_softmax,
    neighbour_loss,
    reliable_neighbours,
    sub_centres,
)
from vireid_fast.methods.hil_kmeans import batched_kmeans
from vireid_fast.models import small_resnet
from vireid_fast.ops import memory_update

TAU = 0.05


def u(deg):
    rad = math.radians(deg)
    return torch.tensor([math.cos(rad), math.sin(rad)], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- K-means
def _problems(rng, sizes, dim, structured):
    feats, groups = [], []
    for g, n in enumerate(sizes):
        if structured:
            pts = rng.randn(dim) * 3 + rng.randn(n, dim) * rng.rand(n, 1)
        else:
            pts = rng.rand(n, dim) * 5
        feats.append(pts)
        groups += [g] * n
    x = np.concatenate(feats).astype(np.float32)
    perm = rng.permutation(len(x))
    return x[perm], np.asarray(groups)[perm]


@pytest.mark.parametrize("k,dim,structured", [(2, 2, False), (3, 8, True), (9, 16, False), (9, 64, True)])
def test_batched_kmeans_equals_sklearn_per_group(k, dim, structured):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.RandomState(k * 100 + dim)
    sizes = [3, k, k + 1, 12, 30, 47, 64, 11]
    x, groups = _problems(rng, sizes, dim, structured)
    out = batched_kmeans(torch.from_numpy(x), torch.from_numpy(groups), len(sizes), k).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g, n in enumerate(sizes):
            member = groups == g
            if n <= k:
                assert (out[member] == -1).all()
                continue
            ref = sklearn_cluster.KMeans(k, random_state=0, n_init=10).fit(x[member]).labels_
            np.testing.assert_array_equal(out[member], ref, err_msg=f"group {g} (n={n})")


def test_batched_kmeans_seed_and_n_init_change_the_result_like_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.RandomState(7)
    x = (rng.rand(60, 4) * 5).astype(np.float32)
    groups = torch.zeros(60, dtype=torch.int64)
    for seed, n_init in ((3, 10), (0, 1), (5, 2)):
        ours = batched_kmeans(torch.from_numpy(x), groups, 1, 5, seed=seed, n_init=n_init).numpy()
        ref = sklearn_cluster.KMeans(5, random_state=seed, n_init=n_init).fit(x).labels_
        np.testing.assert_array_equal(ours, ref)


def test_batched_kmeans_duplicates_fall_back_and_blocks_split(monkeypatch):
    x = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 6)
    assert (batched_kmeans(x, torch.zeros(12, dtype=torch.int64), 1, 3) == -1).all()  # 2 distinct points < K = 3
    rng = np.random.RandomState(0)
    feats, groups = _problems(rng, [20, 25, 30, 7], 6, True)
    whole = batched_kmeans(torch.from_numpy(feats), torch.from_numpy(groups), 4, 3)
    monkeypatch.setattr("vireid_fast.methods.hil_kmeans.BLOCK_ELEMENTS", 1)  # one problem per block
    assert torch.equal(batched_kmeans(torch.from_numpy(feats), torch.from_numpy(groups), 4, 3), whole)


# ---------------------------------------------------------------------------------------------------- SubCentres
def test_sub_centres_small_cluster_mixing_and_shape():
    # cluster 0: 2 members <= K = 2 -> every row the mean; cluster 1: mean (2, 0), K-means halves around it
    feats = torch.tensor([[1.0, 1.0], [1.0, 3.0], [2.0, 2.0], [2.0, -2.0], [2.0, 2.2], [2.0, -2.2]])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    u_ = sub_centres(feats, labels, 2, 2, mix=0.9)
    assert u_.shape == (2, 3, 2)
    torch.testing.assert_close(u_[0], F.normalize(torch.tensor([1.0, 2.0]), dim=0).expand(3, 2))
    torch.testing.assert_close(u_.norm(dim=2), torch.ones(2, 3))
    torch.testing.assert_close(u_[1, 0], torch.tensor([1.0, 0.0]))
    # sub-means (2, 2.1) and (2, -2.1) mixed with the mean (2, 0): (2, +-0.21)
    got = sorted(u_[1, 1:].tolist(), key=lambda r: r[1])
    expect = F.normalize(torch.tensor([[2.0, -0.21], [2.0, 0.21]]), dim=1)
    torch.testing.assert_close(torch.tensor(got), expect)
    # the spec's mixing number: mean (2, 0), sub-mean (0, 2), w = 0.9 -> (0.993884, 0.110432)
    mixed = F.normalize(0.9 * torch.tensor([2.0, 0.0]) + 0.1 * torch.tensor([0.0, 2.0]), dim=0)
    torch.testing.assert_close(mixed, torch.tensor([0.993884, 0.110432]), atol=1e-6, rtol=0)
    paper = sub_centres(feats, labels, 2, 2, mix=0.0, include_mean=False)
    assert paper.shape == (2, 2, 2)
    got = sorted(paper[1].tolist(), key=lambda r: r[1])
    torch.testing.assert_close(torch.tensor(got), F.normalize(torch.tensor([[2.0, -2.1], [2.0, 2.1]]), dim=1))
    assert torch.equal(sub_centres(feats, labels, 2, 2, mix=0.9), u_)  # deterministic (seed 0)


def test_sub_centres_duplicate_points_fall_back_to_the_mean():
    feats = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)  # n = 6 > K = 3 but only 2 distinct points
    u_ = sub_centres(feats, torch.zeros(6, dtype=torch.int64), 1, 3)
    torch.testing.assert_close(u_[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0).expand(4, 2))


# ---------------------------------------------------------------------------------------------------- BRST
def literal_brst(x, y, proto, gamma, ge=True):
    s = F.normalize(x.double(), dim=1) @ F.normalize(proto.double(), dim=1).T
    col = [max(float(s[k, i]) for k in range(s.shape[0])) for i in range(s.shape[1])]
    out = []
    for k in range(s.shape[0]):
        if int(y[k]) < 0:
            out.append(-1)
            continue
        row = [float(v) for v in s[k]]
        i = row.index(max(row))
        ok = row[i] >= gamma * col[i] if ge else row[i] > gamma * col[i]
        out.append(i if ok else -1)
    return torch.tensor(out)


def test_brst_spec_example_and_invariants():
    x = torch.tensor([[1.0, 0], [0.8, 0.6], [0, 1], [-1, 0.1], [0.3, -1]])
    y = torch.tensor([0, 0, 1, -1, 1])
    proto = torch.tensor([[1.0, 0.2], [0.1, 1]])
    for gamma in (0.5, 0.8):
        assert brst(x, y, proto, gamma).tolist() == [0, 0, 1, -1, -1]
    assert brst(x, y, proto, 1e-9).tolist() == [0, 0, 1, -1, 0]  # gamma -> 0: the plain row argmax
    # a row exactly at gamma * column max is kept with >=, dropped with >
    x2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y2 = torch.tensor([0, 0])
    proto2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    gamma = float(F.normalize(x2, dim=1)[1, 0])
    assert brst(x2, y2, proto2, gamma, "ge").tolist() == [0, 0]
    assert brst(x2, y2, proto2, gamma, "gt").tolist() == [0, -1]
    # an outlier identical to a prototype raises its column max and drops another row
    x3 = torch.cat([x, torch.tensor([[0.1, 1.0]])])
    y3 = torch.cat([y, torch.tensor([-1])])
    assert brst(x, y, proto, 0.996).tolist() == [0, -1, 1, -1, -1]
    assert brst(x3, y3, proto, 0.996).tolist() == [0, -1, -1, -1, -1, -1]


def test_brst_ties_go_to_the_first_prototype_and_more_clusters_than_rows():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    proto = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # duplicates, 5 > 2 rows
    assert brst(x, y, proto, 0.5).tolist() == [1, 0]
    assert torch.equal(brst(x, y, proto, 0.5), literal_brst(x, y, proto, 0.5))


def test_brst_against_literal_loop_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    y = torch.randint(-1, 4, (50,), generator=g)
    proto = torch.randn(7, 6, generator=g)
    monkeypatch.setattr(hil_module, "BRST_CHUNK", 8)
    for gamma in (0.3, 0.6, 0.9):
        for compare in ("ge", "gt"):
            assert torch.equal(brst(x, y, proto, gamma, compare), literal_brst(x, y, proto, gamma, compare == "ge"))


# ---------------------------------------------------------------------------------------------------- MCCL
CLUSTERS = [[0, 30], [90, 60], [180, 120]]


def centres(clusters):
    return torch.stack([torch.stack([u(a) for a in c]) for c in clusters])  # (C, P, 2)


def literal_mccl_code(q, U):
    """Spec §2 per row with Python loops over clusters and centres."""
    q = q / q.norm()
    d = [[(q - U[c, p]).norm() for p in range(U.shape[1])] for c in range(U.shape[0])]
    delta = [min(row) for row in d]
    s = min(range(len(delta)), key=lambda c: float(delta[c].detach()))
    pos = sum(1 / v for v in d[s]) / U.shape[1]
    neg = sum(1 / delta[c] for c in range(U.shape[0]) if c != s) / (U.shape[0] - 1)
    return -torch.log(pos / (pos + neg + 1e-8)), s


def literal_mccl_paper(q, U):
    q = q / q.norm()
    cos = [[q @ U[c, p] for p in range(U.shape[1])] for c in range(U.shape[0])]
    best = [max(row) for row in cos]
    s = max(range(len(best)), key=lambda c: float(best[c].detach()))
    sp = sum(torch.exp(v / TAU) for v in cos[s])
    sn = sum(torch.exp(best[c] / TAU) for c in range(len(best)) if c != s)
    return -torch.log(sp / (sp + sn))


def test_mccl_code_form_spec_numbers():
    U = centres(CLUSTERS)
    q = u(10)
    d = (2 - 2 * (U @ q)).sqrt()
    torch.testing.assert_close(d, torch.tensor([[0.174311, 0.347296], [1.285575, 0.845237],
                                                [1.992389, 1.638304]], dtype=torch.float64), atol=1e-6, rtol=0)
    loss, s = mccl_inverse_distance((U @ q)[None].double())
    assert int(s) == 0
    assert loss.item() == pytest.approx(0.189092, abs=1e-6)
    assert (1 / d[0]).mean().item() == pytest.approx(4.308121, abs=1e-6)
    assert 0.5 * (1 / d[1].min() + 1 / d[2].min()).item() == pytest.approx(0.896744, abs=1e-6)


def test_mccl_paper_form_spec_numbers():
    U = centres(CLUSTERS)
    q = u(10)
    assert mccl_softmax((U @ q)[None], TAU)[0].item() == pytest.approx(0.000761, abs=2e-6)
    assert mccl_softmax((U[:, 1:] @ q)[None], TAU)[0].item() == pytest.approx(0.002634, abs=2e-6)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_mccl_values_and_gradients_match_literal_loop(form):
    g = torch.Generator().manual_seed(1)
    U = F.normalize(torch.randn(4, 3, 5, generator=g, dtype=torch.float64), dim=2)
    q = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = q.clone().requires_grad_(True)
    cos = torch.einsum("bd,cpd->bcp", F.normalize(a, dim=1), U)
    ours = (mccl_inverse_distance(cos)[0] if form == "code" else mccl_softmax(cos, TAU)[0]).sum()
    ours.backward()
    b = q.clone().requires_grad_(True)
    ref = sum(literal_mccl_code(b[i], U)[0] if form == "code" else literal_mccl_paper(b[i], U) for i in range(6))
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------- neighbours
def literal_neighbour(f, own_d, own_s, mem_d, mem_s, beta, form, target=None):
    sd = [float(own_d @ m) for m in mem_d]
    ss = [float(own_s @ m) for m in mem_s]
    r = [j for j in range(len(sd)) if sd[j] > beta * max(sd) and ss[j] > beta * max(ss)]
    z = torch.stack([f / f.norm() @ m / TAU for m in (mem_d if target is None else target)])
    p = torch.softmax(z, 0).clamp_min(1e-8)
    if not r:
        return torch.zeros((), dtype=f.dtype), r
    if form == "meanlog":
        return -sum(torch.log(p[j]) for j in r) / (len(r) + 1), r
    return -torch.log(sum(p[j] for j in r)), r


def test_neighbour_spec_numbers_and_empty_set():
    mem_d = torch.stack([u(a) for a in (0, 5, 20, 40, 100)])
    mem_s = torch.stack([u(a) for a in (0, 3, 30, 6, 90)])
    mask = reliable_neighbours(mem_d[:1], mem_s[:1], mem_d, mem_s, 0.9)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1]
    f = u(2)[None]
    assert neighbour_loss(f, mem_d, mask, TAU, "meanlog").item() == pytest.approx(0.583091, abs=1e-6)
    assert neighbour_loss(f, mem_d, mask, TAU, "logsum").item() == pytest.approx(0.181461, abs=1e-6)
    empty = torch.zeros_like(mask)
    assert neighbour_loss(f, mem_d, empty, TAU, "meanlog").item() == 0.0
    assert neighbour_loss(f, mem_d, empty, TAU, "logsum").item() == 0.0
    # cross-modal: the max is over the other memory (no self-similarity of 1)
    other = torch.stack([u(a) for a in (60, 62, 90)])
    cross = reliable_neighbours(mem_d[:1], mem_s[:1], other, other, 0.9)
    assert cross[0].tolist() == [True, True, False]


@pytest.mark.parametrize("form", ["meanlog", "logsum"])
def test_neighbour_values_and_gradients_match_literal_loop(form):
    g = torch.Generator().manual_seed(2)
    mem_d = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    mem_s = F.normalize(mem_d + 0.3 * torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    idx = torch.tensor([0, 3, 3, 7])
    f = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mask = reliable_neighbours(mem_d[idx], mem_s[idx], mem_d, mem_s, 0.5)
    a = f.clone().requires_grad_(True)
    ours = neighbour_loss(a, mem_d, mask, TAU, form)
    ours.backward()
    b = f.clone().requires_grad_(True)
    rows = [literal_neighbour(b[i], mem_d[idx[i]], mem_s[idx[i]], mem_d, mem_s, 0.5, form) for i in range(4)]
    assert [torch.nonzero(mask[i]).flatten().tolist() for i in range(4)] == [r for _, r in rows]
    ref = sum(v for v, _ in rows) / 4
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------- memory rules
def test_memory_update_rules_spec_numbers():
    m = torch.tensor([[1.0, 0.0]])
    memory_update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), m, momentum=0.1, normalized=False)
    torch.testing.assert_close(m[0], torch.tensor([0.110432, 0.993884]), atol=1e-6, rtol=0)
    raw = torch.tensor([[1.0, 0.0]])
    memory_update(torch.tensor([[0.0, 10.0]]), torch.tensor([0]), raw, momentum=0.9, normalized=True)
    torch.testing.assert_close(raw[0], torch.tensor([0.668965, 0.743294]), atol=1e-6, rtol=0)
    nrm = torch.tensor([[1.0, 0.0]])
    memory_update(torch.tensor([[0.0, 10.0]]), torch.tensor([0]), nrm, momentum=0.9, normalized=False)
    torch.testing.assert_close(nrm[0], torch.tensor([0.993884, 0.110432]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- the method
VIS_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0])
IR_LABELS = torch.tensor([0, 0, 1, 1, 1, -1, 0, 1, 1])


def make_method(*overrides, name="hil", seed=0):
    torch.manual_seed(seed)
    model = small_resnet(widths=(8, 8, 8, 16))
    config = load_config(None, [f"method.name={name}", "train.num_identities=2", "train.num_instances=2",
                                "train.iters=3", "method.num_subcentres=2", *overrides])
    context = make_context(model, config)
    method = __import__("vireid_fast.methods", fromlist=["get_method"]).get_method(name)(config.method, context)
    g = torch.Generator().manual_seed(seed + 1)
    proto = torch.randn(3, 16, generator=g)
    vis = proto[VIS_LABELS.clamp(min=0)] + 0.3 * torch.randn(12, 16, generator=g)
    ir = proto[torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 1])] + 0.3 * torch.randn(9, 16, generator=g)
    feats = {"visible": {"f": vis * 3, "g": vis * 2 + 0.2 * torch.randn(12, 16, generator=g)},
             "infrared": {"f": ir * 3, "g": ir * 2 + 0.2 * torch.randn(9, 16, generator=g)}}
    return method, feats


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8, generator=g)
    return TrainBatch(images, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 3, 4]), images.flip(0),
                      torch.tensor([1, 1, 0, 0]), torch.tensor([2, 3, 0, 1]))


def prepare(method, feats, epoch):
    method.start_epoch(epoch)
    labels = method.associate(feats, {"visible": VIS_LABELS.clone(), "infrared": IR_LABELS.clone()})
    method.build_memories(feats, labels)
    return labels


def capture_rows(method):
    captured = {}
    original = method.encode_batch
    method.encode_batch = lambda b: captured.setdefault("rows", original(b))
    return captured


def test_build_memories_brst_shared_memories_and_centres():
    method, feats = make_method()
    labels = prepare(method, feats, 0)
    assert torch.equal(labels["infrared"], IR_LABELS)
    x_v = torch.cat([feats["visible"]["f"], feats["visible"]["g"]], 1)
    x_r = torch.cat([feats["infrared"]["f"], feats["infrared"]["g"]], 1)
    proto = torch.stack([x_r[IR_LABELS == c].mean(0) for c in range(2)])
    assert torch.equal(labels["visible"], literal_brst(x_v, VIS_LABELS, proto, 0.5))
    pooled_f = torch.cat([feats["visible"]["f"], feats["infrared"]["f"]])
    pooled_y = torch.cat([labels["visible"], labels["infrared"]])
    for c in range(2):
        torch.testing.assert_close(method.id_deep[c], F.normalize(pooled_f[pooled_y == c].mean(0), dim=0))
    assert method.centres_deep.shape == (2, 3, 16) and method.centres_shallow.shape == (2, 3, 16)
    torch.testing.assert_close(method.centres_deep[:, 0], method.id_deep)
    torch.testing.assert_close(method.instance_shallow_infrared, F.normalize(feats["infrared"]["g"], dim=1))
    assert method.shared_label_space


def test_identity_loss_shared_memory_gradient_and_update_order():
    method, feats = make_method()
    prepare(method, feats, 0)
    memory = method.id_deep.clone()
    cap = capture_rows(method)
    losses = method.training_step(batch())
    rows = cap["rows"]
    fv, fr = rows["visible"][0].detach(), rows["infrared"][0].detach()
    yv, yr = rows["visible"][2], rows["infrared"][2]
    a, b = fv.clone().double().requires_grad_(True), fr.clone().double().requires_grad_(True)

    def literal_ce(f, y):
        z = F.normalize(f, dim=1) @ memory.double().T / TAU
        return sum(torch.logsumexp(z[i], 0) - z[i, int(y[i])] for i in range(f.shape[0])) / f.shape[0]

    ref = literal_ce(a, yv) + literal_ce(b, yr)
    assert losses["id_deep"].item() == pytest.approx(ref.item(), rel=1e-5)
    # gradients of both modalities from the pre-update memory
    grads = torch.autograd.grad(losses["id_deep"], [rows["visible"][0], rows["infrared"][0]], retain_graph=True)
    ref_grads = torch.autograd.grad(ref, [a, b])
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1].double(), ref_grads[1], atol=1e-5, rtol=1e-4)
    # the update after backward: visible rows in batch order, then infrared rows, each step renormalised
    method.id_deep.copy_(memory)
    losses["id_deep"].backward(retain_graph=True)
    expect = memory.clone()
    for f, y in zip(torch.cat([fv, fr]), torch.cat([yv, yr]), strict=True):
        expect[y] = F.normalize(0.1 * expect[y] + 0.9 * F.normalize(f, dim=0), dim=0)
    torch.testing.assert_close(method.id_deep, expect, atol=1e-6, rtol=0)
    reversed_order = memory.clone()
    for f, y in zip(torch.cat([fr, fv]), torch.cat([yr, yv]), strict=True):
        reversed_order[y] = F.normalize(0.1 * reversed_order[y] + 0.9 * F.normalize(f, dim=0), dim=0)
    assert not torch.allclose(method.id_deep, reversed_order, atol=1e-4)


def test_instance_memory_updated_after_the_step_with_raw_outputs():
    method, feats = make_method()
    prepare(method, feats, 0)
    before = method.instance_deep_visible.clone()
    cap = capture_rows(method)
    method.training_step(batch())
    assert torch.equal(method.instance_deep_visible, before)  # nothing before the gradient
    method.after_step(0)
    fv, idx = cap["rows"]["visible"][0].detach(), cap["rows"]["visible"][3]
    expect = before.clone()
    for f, n in zip(fv, idx, strict=True):  # both views of an image, in order, raw outputs
        expect[n] = F.normalize(0.9 * expect[n] + 0.1 * f, dim=0)
    torch.testing.assert_close(method.instance_deep_visible, expect, atol=1e-6, rtol=0)
    assert idx.tolist() == [0, 1, 3, 4, 0, 1, 3, 4]


def test_step_total_equals_literal_terms():
    method, feats = make_method()
    prepare(method, feats, 0)
    memories = {k: v.clone() for k, v in method.named_buffers()}
    cap = capture_rows(method)
    losses = method.training_step(batch())
    rows = {m: [t.detach().double() if t is not None and t.is_floating_point() else t for t in r]
            for m, r in cap["rows"].items()}
    mem = {k: v.double() for k, v in memories.items()}

    def nb(q, t):
        own = rows[q][3]
        total = 0.0
        for k, (b, w) in enumerate((("deep", 1.0), ("shallow", 0.5))):
            vals = [literal_neighbour(rows[q][k][i], mem[f"instance_deep_{q}"][own[i]],
                                      mem[f"instance_shallow_{q}"][own[i]], mem[f"instance_deep_{t}"],
                                      mem[f"instance_shallow_{t}"], 0.9, "meanlog", mem[f"instance_{b}_{t}"])[0]
                    for i in range(len(own))]
            total += w * sum(float(v) for v in vals) / len(vals)
        return total

    expect_nb = nb("visible", "visible") + nb("infrared", "infrared") + 0.1 * nb("visible", "infrared")  # e = 0
    assert losses["neighbor"].item() == pytest.approx(0.1 * expect_nb, rel=1e-5)

    def mc(m):
        per = {}
        for k, b in enumerate(("deep", "shallow")):
            per[b] = [literal_mccl_code(rows[m][k][i], mem[f"centres_{b}"]) for i in range(rows[m][k].shape[0])]
        valid = [i for i in range(len(per["deep"])) if per["deep"][i][1] == per["shallow"][i][1]]
        if not valid:
            return 0.0
        return sum(float(per["deep"][i][0]) + 0.5 * float(per["shallow"][i][0]) for i in valid) / len(valid)

    assert losses["mccl"].item() == pytest.approx(0.1 * 2 * (mc("visible") + mc("infrared")), rel=1e-5)
    assert set(losses) == {"id_deep", "id_shallow", "neighbor", "mccl"}


@pytest.mark.parametrize("epoch,cross,lam2", [(18, "vr", 0.1), (19, "rv", 0.1), (20, "vr", 1.0)])
def test_schedule_by_epoch(epoch, cross, lam2, monkeypatch):
    method, feats = make_method()
    prepare(method, feats, epoch)
    calls = []
    monkeypatch.setattr(method, "identity_loss", lambda rows, b: torch.tensor(1.0 if b == "deep" else 2.0))
    monkeypatch.setattr(method, "neighbor_term", lambda rows, q, t: calls.append(q[0] + t[0]) or torch.tensor(10.0))
    monkeypatch.setattr(method, "mccl_total", lambda rows: torch.tensor(100.0))
    losses = method.training_step(batch())
    assert calls == ["vv", "ii", "vi" if cross == "vr" else "iv"]
    total = sum(v.item() for v in losses.values())
    scale = 0.1 if cross == "vr" else 1.0
    assert total == pytest.approx(1 + 2 + 0.1 * (10 + 10 + scale * 10) + lam2 * 100)


def test_mccl_cross_duplicate_and_valid_mask_switches():
    method, feats = make_method()
    prepare(method, feats, 0)
    full = method.training_step(batch())["mccl"].item()
    method2, _ = make_method("method.mccl_cross_duplicate=false")
    prepare(method2, feats, 0)
    assert method2.training_step(batch())["mccl"].item() == pytest.approx(full / 2, rel=1e-6)
    method4, _ = make_method("method.mccl_empty=nan")
    prepare(method4, feats, 0)
    method4.centres_shallow = method4.centres_shallow.clone()
    method4._mc = lambda cos: HIL._mc(method4, {"deep": cos["deep"], "shallow": cos["deep"][:, [1, 0]]})
    assert math.isnan(method4.training_step(batch())["mccl"].item())  # 2 clusters swapped: nobody agrees
    method5, _ = make_method()
    prepare(method5, feats, 0)
    method5._mc = lambda cos: HIL._mc(method5, {"deep": cos["deep"], "shallow": cos["deep"][:, [1, 0]]})
    assert method5.training_step(batch())["mccl"].item() == 0.0


def test_mccl_valid_rows_need_deep_and_shallow_agreement():
    method, _ = make_method()
    U = centres(CLUSTERS)
    deep = torch.stack([U @ u(10), U @ u(80)])             # nearest clusters 0 and 1
    shallow = torch.stack([U @ u(5), U @ u(175)])          # 0 (agrees) and 2 (disagrees)
    value = method._mc({"deep": deep, "shallow": shallow})
    expect = mccl_inverse_distance(deep)[0][0] + 0.5 * mccl_inverse_distance(shallow)[0][0]
    assert value.item() == pytest.approx(expect.item(), rel=1e-12)
    off, _ = make_method("method.mccl_valid_mask=false")
    both = off._mc({"deep": deep, "shallow": shallow})
    expect = mccl_inverse_distance(deep)[0].mean() + 0.5 * mccl_inverse_distance(shallow)[0].mean()
    assert both.item() == pytest.approx(expect.item(), rel=1e-12)


@pytest.mark.parametrize("switch,removed", [
    ("method.brst=false", "brst"), ("method.mccl=false", "mccl"), ("method.neighbor=false", "neighbor"),
    ("method.lambda1=0", "neighbor"), ("method.shallow=false", "shallow")])
def test_ablation_switches_remove_exactly_their_terms(switch, removed):
    method, feats = make_method(switch)
    if removed == "shallow":
        feats = {m: {"f": v["f"]} for m, v in feats.items()}
    labels = prepare(method, feats, 0)
    losses = method.training_step(batch())
    expect = {"id_deep", "id_shallow", "neighbor", "mccl"} - {removed} - (
        {"id_shallow"} if removed == "shallow" else set())
    assert set(losses) == expect
    assert method.shared_label_space == (removed != "brst")
    if removed == "brst":  # two label spaces, per-modality memories and (code) genuinely cross MCCL
        assert torch.equal(labels["visible"], VIS_LABELS)
        assert method.id_deep is None and method.id_deep_visible.shape == (3, 16)
        assert method.centres_deep_infrared.shape == (2, 3, 16)
    if removed == "mccl":
        assert method.centres_deep is None
    if removed == "shallow":
        assert method.shallow_head is None and method.instance_shallow_visible is None
    for value in losses.values():
        assert math.isfinite(value.item())


def test_warm_start_stage_is_dcl_like_then_hil():
    method, feats = make_method("method.warm_start_epochs=2")
    labels = prepare(method, feats, 1)
    assert method.warm and not method.shared_label_space
    assert torch.equal(labels["visible"], VIS_LABELS)
    assert set(method.training_step(batch())) == {"id_deep", "id_shallow"}
    assert method.id_deep_visible.shape == (3, 16) and method.centres_deep is None
    prepare(method, feats, 2)
    assert method.hil_epoch == 0 and set(method.training_step(batch())) == {"id_deep", "id_shallow", "neighbor",
                                                                            "mccl"}


def test_alternate_direction_relabels_infrared_on_odd_epochs():
    method, feats = make_method("method.brst_direction=alternate")
    labels = prepare(method, feats, 1)
    assert torch.equal(labels["visible"], VIS_LABELS)
    assert labels["infrared"].max() < 3 and method.id_deep.shape == (3, 16)  # C = M_v
    labels = prepare(method, feats, 2)
    assert torch.equal(labels["infrared"], IR_LABELS) and method.id_deep.shape == (2, 16)


def test_paper_preset_memories_and_subcentre_update():
    method, feats = make_method(name="hil_paper")
    prepare(method, feats, 0)
    assert method.centres_deep_visible.shape == (2, 2, 16)  # per modality, no mean row
    before = method.centres_deep_visible.clone()
    cap = capture_rows(method)
    losses = method.training_step(batch())
    assert set(losses) == {"id_deep", "id_shallow", "neighbor", "mccl"}
    sum(losses.values()).backward()
    # literal Alg. 1 update: per visible row in order, its cluster's most similar centre (chosen before the step)
    x = F.normalize(cap["rows"]["visible"][0].detach(), dim=1)
    y = cap["rows"]["visible"][2]
    expect = before.clone()
    for b in range(x.shape[0]):
        p = int(torch.argmax(before[y[b]] @ x[b]))
        expect[y[b], p] = F.normalize(0.1 * expect[y[b], p] + 0.9 * x[b], dim=0)
    torch.testing.assert_close(method.centres_deep_visible, expect, atol=1e-6, rtol=0)
    code, _ = make_method()
    prepare(code, feats, 0)
    before = code.centres_deep.clone()
    sum(code.training_step(batch()).values()).backward()
    assert torch.equal(code.centres_deep, before)  # code: static for the epoch


def test_finish_embeddings_per_part_and_joint():
    method, _ = make_method()
    f = torch.tensor([[3.0, 4.0, 0.0, 2.0]])
    torch.testing.assert_close(method.finish_embeddings({"feature": f})["feature"], torch.tensor([[0.6, 0.8, 0, 1]]))
    joint, _ = make_method("method.test_feature=joint")
    torch.testing.assert_close(joint.finish_embeddings({"feature": f})["feature"], F.normalize(f, dim=1))


# ---------------------------------------------------------------------------------------------------- in the engine
from tests.engine.tiny import assert_same_state, resume_after_kill, tiny_config, tiny_root  # noqa: E402

ENGINE = ("method.warm_start_epochs=1", "method.num_subcentres=2", "eval.eval_untrained=false", "cluster.eps=0.8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_root(tmp_path_factory)


@pytest.mark.parametrize("name,extra", [("hil", ()), ("hil_paper", ()), ("hil", ("method.shallow=false",)),
                                        ("hil", ("method.shallow_head=pool_proj_stage3", "method.brst=false"))])
def test_trains_in_the_engine(tiny, tmp_path, name, extra):
    import json

    from vireid_fast.engine.trainer import Trainer

    overrides = (f"method.name={name}", *ENGINE, "train.epochs=3", *extra)
    trainer = Trainer(tiny_config(str(tmp_path / "run"), *overrides), data_root=tiny, log=lambda *a, **k: None,
                      progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["hil/warm"] for r in train_rows] == [1.0, 0.0, 0.0]
    assert all(math.isfinite(r["loss/total"]) for r in train_rows)
    assert "loss/mccl" in train_rows[-1] and "loss/neighbor" in train_rows[-1]
    assert ("brst/kept" in train_rows[-1]) == ("method.brst=false" not in extra)
    assert 0 < train_rows[-1]["hil/subcentres_s"] <= train_rows[-1]["time/memory"]
    from vireid_fast.modality import VISIBLE

    feature = trainer.embed_dataset(trainer.train_sets[VISIBLE], VISIBLE)["feature"]  # the engine's finish hook
    if "method.shallow=false" in extra:
        torch.testing.assert_close(feature.norm(dim=1), torch.ones(feature.shape[0]))
    else:  # per_part: deep and shallow halves unit-norm each
        half = feature.shape[1] // 2
        torch.testing.assert_close(feature[:, :half].norm(dim=1), torch.ones(feature.shape[0]))
        torch.testing.assert_close(feature[:, half:].norm(dim=1), torch.ones(feature.shape[0]))


def test_resumes_bit_exact(tiny, tmp_path, monkeypatch):
    from vireid_fast.engine.trainer import Trainer

    def quiet(*args, **kwargs):
        pass

    overrides = ("method.name=hil", *ENGINE, "train.epochs=3")
    full = Trainer(tiny_config(str(tmp_path / "full"), *overrides), data_root=tiny, log=quiet, progress=False)
    full.fit()
    resumed = resume_after_kill(tiny, str(tmp_path / "killed"), overrides, 2, monkeypatch, quiet)
    resumed.fit()
    assert_same_state((full.encoder, resumed.encoder), (full.method, resumed.method))


def test_shallow_head_follows_the_encoder_mode_and_starts_from_stage4():
    method, _ = make_method()
    head = method.shallow_head
    encoder = method.ctx.encoder
    for a, b in zip(head.layer4.parameters(), encoder.layer4.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, trained separately
    images = torch.rand(4, 3, 32, 16)
    stats = head.bnneck.running_mean.clone()
    encoder.eval()
    out = method.embed(encoder, images, 0)  # extraction: eval mode, statistics untouched
    assert torch.equal(head.bnneck.running_mean, stats) and head.training
    assert set(out) == {"f", "g", "feature"} and out["feature"].shape == (4, 32)
    encoder.train()
    method.encode(encoder, images, 0)
    assert not torch.equal(head.bnneck.running_mean, stats)
    cheap, _ = make_method("method.shallow_head=pool_proj_stage3")
    assert cheap.shallow_head.source == "stage3" and cheap.encode(encoder, images, 0)[1].shape == (4, 16)
