"""SWPCL (vireid_fast interpretation, swpcl.md): the soft-prototype memory against literal implementations of its
equations (§2, §3, §10) and the method's schedule, cross term and ablations."""

import pytest
import torch
import torch.nn.functional as F

from vireid_fast.memory import SoftPrototypeMemory


def n(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float64), dim=0)


def memory_from(cm, sp, mask=None, **kwargs):
    """A built memory with the given centroids (C, D) and soft prototypes (C, K, D)."""
    cm, sp = torch.stack(cm), torch.stack([torch.stack(row) for row in sp])
    c, k, d = sp.shape
    memory = SoftPrototypeMemory(d, num_prototypes=k, **kwargs).double()
    memory.bank = torch.cat([cm, sp.reshape(-1, d)]).clone()
    memory.mask = torch.ones(c, k, dtype=torch.float64) if mask is None else mask.double()
    memory.sims = torch.einsum("cd,ckd->ck", cm, sp) * memory.mask
    memory.weights = memory._weights(memory.sims, memory.mask)
    return memory


def literal_sw(f, y, cm, sp, w, tau):
    """ℓ_SW of §2.2 written per sample and per slot."""
    total = 0.0
    for b in range(f.shape[0]):
        fb = f[b] / f[b].norm()
        yb = int(y[b])
        neg = [torch.exp(fb @ cm[c] / tau) for c in range(cm.shape[0]) if c != yb]
        for k in range(sp.shape[1]):
            if w[yb, k] == 0:
                continue
            a = fb @ sp[yb, k] / tau
            total = total + w[yb, k] * (torch.log(torch.exp(a) + sum(neg, torch.zeros((), dtype=f.dtype))) - a)
    return total / f.shape[0]


def literal_ce(f, y, cm, tau):
    fn = f / f.norm(dim=1, keepdim=True)
    z = fn @ cm.T / tau
    return sum(torch.logsumexp(z[b], 0) - z[b, int(y[b])] for b in range(f.shape[0])) / f.shape[0]


def spec_memory(**kwargs):
    return memory_from([n(1, 0, 0), n(0, 1, 0)], [[n(1, 0.2, 0), n(1, 0, 0.5)], [n(0, 1, 0.1), n(0.3, 1, 0)]],
                       temp=0.5, sw_temp=0.1, **kwargs)


def test_spec_worked_example():
    memory = spec_memory()
    torch.testing.assert_close(memory.sims, torch.tensor([[0.980581, 0.894427], [0.995037, 0.957826]],
                                                         dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(memory.weights, torch.tensor([[0.702981, 0.297019], [0.591969, 0.408031]],
                                                            dtype=torch.float64), atol=2e-6, rtol=0)
    f = n(2, 1, 0.5)[None]
    y = torch.tensor([0])
    assert memory(f, y, lam=1.0, update="none").item() == pytest.approx(0.321037, abs=2e-6)
    assert memory(f, y, lam=0.0, update="none").item() == pytest.approx(0.349071, abs=2e-6)
    mixed = memory(f, y, lam=0.3, update="none").item()
    assert mixed == pytest.approx(0.7 * 0.349071 + 0.3 * 0.321037, abs=2e-6)


def test_loss_and_gradient_against_literal_random():
    g = torch.Generator().manual_seed(0)
    c, k, d = 3, 4, 6
    cm = list(F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1))
    sp = [list(F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)) for _ in range(c)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    memory = memory_from(cm, sp, mask, temp=0.1)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    lam = 0.4
    a = x.clone().requires_grad_(True)
    memory(a, y, lam=lam, update="none").backward()
    b = x.clone().requires_grad_(True)
    expect = (1 - lam) * literal_ce(b, y, torch.stack(cm), 0.1) + lam * literal_sw(
        b, y, torch.stack(cm), torch.stack([torch.stack(r) for r in sp]), memory.weights, 0.1)
    expect.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert memory(x, y, lam=lam, update="none").item() == pytest.approx(expect.item(), rel=1e-12)
    torch.testing.assert_close(memory.weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert memory.weights[2, 1:].abs().sum() == 0


def test_identities():
    g = torch.Generator().manual_seed(1)
    cm = list(F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1))
    same = memory_from(cm, [[cm[c]] * 2 for c in range(3)])
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    assert same(x, y, lam=1.0, update="none").item() == pytest.approx(same(x, y, lam=0.0, update="none").item(),
                                                                       rel=1e-12)
    sp = [[F.normalize(torch.randn(5, generator=g, dtype=torch.float64), dim=0)] for _ in range(3)]
    one = memory_from(cm, sp, temp=0.05)
    # K = 1: CE with the positive logit replaced by f . sp_y / tau
    f = F.normalize(x, dim=1)
    z = f @ torch.stack(cm).T / 0.05
    z[torch.arange(4), y] = (f * torch.stack([sp[int(c)][0] for c in y])).sum(1) / 0.05
    assert one(x, y, lam=1.0, update="none").item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-12)
    hot = memory_from(cm, [[cm[0], cm[1], cm[2]]] * 3, sw_temp=1e9)
    uni = memory_from(cm, [[cm[0], cm[1], cm[2]]] * 3, sw_form="uniform")
    torch.testing.assert_close(hot.weights, uni.weights)


def test_build_selects_top_k_members_with_mask_and_ties():
    # cluster 0: 6 members at known angles; cluster 1: 2 members; outliers never selected
    angles = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.7])
    members = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(6)], 1)
    members[:, 1] -= members[:, 1].mean()  # centroid along e1 after normalisation
    members = F.normalize(members, dim=1)
    feats = torch.cat([members, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.1, 1.0], [5.0, 5.0, 5.0]])])
    labels = torch.tensor([0] * 6 + [1, 1, -1])
    memory = SoftPrototypeMemory(3, num_prototypes=4)
    memory.build(feats, labels)
    centroid = F.normalize(members.mean(0), dim=0)
    sims = members @ centroid
    order = sorted(range(6), key=lambda i: (-float(sims[i]), i))[:4]
    torch.testing.assert_close(memory.soft[0], members[order])
    assert memory.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert memory.weights[1, 2:].sum() == 0
    torch.testing.assert_close(memory.weights.sum(1), torch.ones(2))
    ties = SoftPrototypeMemory(2, num_prototypes=2)
    ties.build(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(ties.soft[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # equal sims: lower index
    with pytest.raises(ValueError, match="without gaps"):
        SoftPrototypeMemory(2).build(torch.ones(2, 2), torch.tensor([0, 2]))


def test_update_rank_matched_with_pre_update_centroid():
    e1 = n(1, 0, 0)
    s0, s1 = n(1, 0.1, 0), n(1, 0, 0.1)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    other = [n(0, 1, 0), n(0, 1, 0.1), n(0, 1, 0.2)]
    memory = memory_from([e1, n(0, 1, 0)], [[s0, s1, e1], other], mask, momentum=0.1)
    before = memory.bank.clone()
    a = torch.tensor([0.5, 0.75 ** 0.5, 0.0], dtype=torch.float64)
    b = torch.tensor([0.55, 0.0, 0.6975 ** 0.5], dtype=torch.float64)
    c = torch.tensor([0.55, 0.6975 ** 0.5, 0.0], dtype=torch.float64)
    x = torch.stack([a, b, c]).requires_grad_(True)
    memory(x, torch.zeros(3, dtype=torch.int64), lam=1.0).backward()
    centre = F.normalize(0.1 * e1 + 0.9 * torch.stack([a, b, c]).mean(0), dim=0)
    torch.testing.assert_close(memory.centroids[0], centre)
    # ranking by the pre-update centroid e1: b and c tie at 0.55 -> batch order b, c; then a
    torch.testing.assert_close(memory.soft[0, 0], F.normalize(0.1 * s0 + 0.9 * b, dim=0))
    torch.testing.assert_close(memory.soft[0, 1], c)  # invalid slot: filled without momentum
    torch.testing.assert_close(memory.soft[0, 2], a)
    assert memory.mask[0].tolist() == [1, 1, 1]
    assert torch.equal(memory.bank[1], before[1]) and torch.equal(memory.soft[1], before[2:].view(2, 3, 3)[1])
    sims = torch.einsum("kd,d->k", memory.soft[0], memory.centroids[0])
    torch.testing.assert_close(memory.sims[0], sims)
    torch.testing.assert_close(memory.weights[0], torch.softmax(sims / 0.1, 0))
    torch.testing.assert_close(memory.bank.norm(dim=1), torch.ones(memory.bank.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["centroid_only", "none", "static"])
def test_update_modes(mode):
    memory = spec_memory(sp_update="static") if mode == "static" else spec_memory()
    before = memory.bank.clone()
    weights = memory.weights.clone()
    x = n(2, 1, 0.5)[None].clone().requires_grad_(True)
    memory(x, torch.tensor([0]), update="none" if mode == "none" else
           ("centroid_only" if mode == "centroid_only" else "all")).backward()
    assert torch.equal(memory.bank[2:], before[2:])  # soft rows untouched
    assert torch.equal(memory.bank[1], before[1])
    assert torch.equal(memory.bank[0], before[0]) == (mode == "none")
    assert torch.equal(memory.weights, weights) == (mode != "centroid_only")  # s and w follow the centroid


# ---------------------------------------------------------------------------------------------------- the method
from .test_pclhd import batch, make_method, prepare  # noqa: E402


def test_lambda_schedule():
    method, _, _ = make_method(name="swpcl")
    lams = []
    for epoch in range(5):
        method.start_epoch(epoch)
        lams.append(method.sw_lambda_e)
    assert lams == [0.0, 0.0, 0.5, 0.5, 0.5]
    ramp, _, _ = make_method("method.sw_ramp_epochs=10", name="swpcl")
    got = []
    for epoch in range(2, 15):
        ramp.start_epoch(epoch)
        got.append(ramp.sw_lambda_e)
    assert got == pytest.approx([0.05 * i for i in range(1, 11)] + [0.5] * 3)
    flat, _, _ = make_method("method.progressive=false", name="swpcl")
    flat.start_epoch(0)
    assert flat.sw_lambda_e == 0.5 and not flat.ema_active  # the EMA still starts at stage 2
    off, _, _ = make_method("method.sp=false", name="swpcl")
    off.start_epoch(3)
    assert off.sw_lambda_e == 0.0
    with pytest.raises(ValueError, match="method.hpcl"):
        make_method("method.hpcl=true", name="swpcl")


def test_stage1_is_two_centroid_terms():
    method, feats, _ = make_method(name="swpcl")
    prepare(method, feats, 0)
    cms = {m: getattr(method, f"soft_{m}").centroids.clone().double() for m in ("visible", "infrared")}
    captured = {}
    original = method._encode
    method._encode = lambda *a: captured.setdefault("f", original(*a))
    losses = method.training_step(batch())
    f_vis, f_ir, _ = captured["f"]
    assert set(losses) == {"infrared", "visible"}
    assert losses["infrared"].item() == pytest.approx(
        literal_ce(f_ir.detach().double(), [1, 1, 0, 0], cms["infrared"], 0.05).item(), rel=1e-6)
    assert losses["visible"].item() == pytest.approx(
        literal_ce(f_vis.detach().double(), [0, 0, 2, 2] * 2, cms["visible"], 0.05).item(), rel=1e-6)
    assert "dpcl" not in method.ctx.logged_values


@pytest.mark.parametrize("epoch,target", [(2, "infrared"), (3, "visible")])
def test_stage2_cross_term_and_ema(epoch, target):
    method, feats, _ = make_method("method.cross_updates_bank=none", name="swpcl")
    prepare(method, feats, epoch)
    assert method.eval_encoder() is method.ctx.ema.module
    bn = method.ctx.ema.module.bnneck.running_mean.clone()
    before = {m: getattr(method, f"soft_{m}").bank.clone() for m in ("visible", "infrared")}
    # only the cross call touches the target bank when the intra call of that modality is removed
    other = "visible" if target == "infrared" else "infrared"
    losses = method.training_step(batch())
    assert set(losses) == {"infrared", "visible", "cross"}
    assert not torch.equal(method.ctx.ema.module.bnneck.running_mean, bn)
    losses["cross"].backward()
    assert torch.equal(getattr(method, f"soft_{target}").bank, before[target])
    assert torch.equal(getattr(method, f"soft_{other}").bank, before[other])
    method2, feats2, _ = make_method(name="swpcl")
    prepare(method2, feats2, epoch)
    before = getattr(method2, f"soft_{target}").bank.clone()
    method2.training_step(batch())["cross"].backward()
    assert not torch.equal(getattr(method2, f"soft_{target}").bank, before)


def test_ablation_rows():
    base, feats, _ = make_method("method.sp=false", name="swpcl")
    prepare(base, feats, 2)
    full, feats2, _ = make_method(name="swpcl")
    prepare(full, feats2, 2)
    a, b = base.training_step(batch()), full.training_step(batch())
    assert set(a) == set(b) == {"infrared", "visible", "cross"}
    assert a["infrared"].item() != pytest.approx(b["infrared"].item())
    with_dpcl, feats3, _ = make_method("method.dpcl=true", name="swpcl")
    prepare(with_dpcl, feats3, 2)
    with_dpcl.training_step(batch())
    assert "dpcl" in with_dpcl.ctx.logged_values
    no_ema, feats4, _ = make_method("method.ema=false", name="swpcl")
    prepare(no_ema, feats4, 2)
    assert no_ema.ctx.ema is None and no_ema.eval_encoder() is no_ema.ctx.encoder
    no_ema.training_step(batch())


def test_degenerate_shapes_stay_finite():
    one = SoftPrototypeMemory(4, num_prototypes=1)
    one.build(torch.randn(3, 4), torch.tensor([0, 0, 0]))  # C = 1: no negatives
    x = torch.randn(5, 4, requires_grad=True)
    loss = one(x, torch.zeros(5, dtype=torch.int64), lam=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    small = SoftPrototypeMemory(4, num_prototypes=8)
    small.build(torch.randn(7, 4), torch.tensor([0, 1, 1, 2, 2, 2, -1]))  # clusters smaller than K
    x = torch.randn(13, 4, requires_grad=True)
    loss = small(x, torch.tensor([0, 1, 2, 2, 2, 1, 0, 0, 1, 2, 1, 0, 2]), lam=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(small.weights.sum(1), torch.ones(3))
    # slots valid after the update: max(members at build, batch rows of the class) capped at K
    assert small.mask.sum(1).tolist() == [4, 4, 5]
