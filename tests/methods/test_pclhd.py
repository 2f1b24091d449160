"""PCLHD: memories pinned to the spec's worked numbers (pclhd.md §10, computed with the official autograd functions),
loss terms against literal implementations of their equations, the method's schedule, branches and ablations."""

import math

import pytest
import torch
import torch.nn.functional as F

from vireid_fast.memory import DynamicMemory, HybridMemory

TAU, ALPHA = 0.05, 0.1


def n(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float64), dim=0)


def hybrid(bank, **kwargs):
    memory = HybridMemory(bank[0].numel(), len(bank) // 2, temp=TAU, momentum=ALPHA, **kwargs).double()
    memory.features = torch.stack(bank).clone()
    return memory


RAW = [[2.0, 0, 0], [1, 1, 1], [0, 3, 0], [1, 2, 2]]
LABELS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("case", ["inactive", "active"])
def test_hybrid_loss_gradient_and_update_match_official_numbers(case):
    if case == "inactive":
        bank = [n(1, 0, 0), n(0, 1, 0), n(1, 1, 0), n(0, 1, 1)]
        expect = dict(hard=0.348806, cen=0.173605, loss=0.174403,
                      grad=[(0, 0, 6.4e-7), (-0.510310, 0, 0.510310), (0.294628, 0, -0.294628),
                            (0.005820, 0.001164, -0.004074)],
                      after=[(0.910650, 0.292161, 0.292161), (0.164153, 0.930199, 0.328305),
                             (0.600324, 0.600324, 0.528415), (0.301556, 0.674190, 0.674190)])
    else:
        bank = [n(1, 1, 0), n(1, 0, 1), n(1, 0, 0), n(0, 0, 1)]
        expect = dict(hard=0.346892, cen=4.055394, loss=2.101143,
                      grad=[(0, -0.441942, 0.441942), (-0.721688, -0.510310, 1.231998),
                            (0.416667, 0, -1.005922), (0.001177, 0.294863, -0.295452)],
                      after=[(0.880411, 0.372819, 0.293058), (0.255086, 0.866812, 0.428449), (1, 0, 0),
                             (0, 0.993884, 0.110432)])
    memory = hybrid(bank)
    x = torch.tensor(RAW, dtype=torch.float64, requires_grad=True)
    cen, hard = memory.terms(x, LABELS)
    loss = 0.5 * hard + 0.5 * torch.relu(cen - 0.2)
    assert hard.item() == pytest.approx(expect["hard"], abs=2e-6)
    assert cen.item() == pytest.approx(expect["cen"], abs=2e-6)
    assert loss.item() == pytest.approx(expect["loss"], abs=2e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor(expect["grad"], dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(memory.features, torch.tensor(expect["after"], dtype=torch.float64), atol=2e-6,
                               rtol=0)


def literal_hybrid(x, labels, bank, w_h=0.5, w_c=0.5, rho=0.2):
    """Spec §2.3 written out per sample: mean over b of log-sum-exp minus the target logit, per half."""
    f = x / x.norm(dim=1, keepdim=True)
    c = bank.shape[0] // 2
    ce = [0.0, 0.0]
    for b in range(f.shape[0]):
        for half in range(2):
            z = [f[b] @ bank[half * c + k] / TAU for k in range(c)]
            ce[half] = ce[half] + torch.logsumexp(torch.stack(z), 0) - z[int(labels[b])]
    ce_cen, ce_hard = ce[0] / f.shape[0], ce[1] / f.shape[0]
    return w_h * ce_hard + w_c * torch.clamp(ce_cen - rho, min=0)


def test_hybrid_against_literal_random():
    g = torch.Generator().manual_seed(0)
    bank = list(F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1))
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    memory = hybrid(bank)
    frozen = torch.stack(bank).clone()
    a = x.clone().requires_grad_(True)
    cen, hard = memory.terms(a, labels)
    (0.5 * hard + 0.5 * torch.relu(cen - 0.2)).backward()
    b = x.clone().requires_grad_(True)
    expect = literal_hybrid(b, labels, frozen)
    expect.backward()
    assert (0.5 * hard + 0.5 * torch.relu(cen - 0.2)).item() == pytest.approx(expect.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_hard_member_uses_pre_update_centroid():
    e1 = n(1, 0, 0)
    memory = hybrid([e1, e1])
    a = torch.tensor([0.5, math.sqrt(0.75), 0])
    b = torch.tensor([0.55, 0, math.sqrt(0.6975)])
    c = torch.tensor([0.55, math.sqrt(0.6975), 0])
    x = torch.stack([a, b, c]).double().requires_grad_(True)
    cen, hard = memory.terms(x, torch.zeros(3, dtype=torch.int64))
    assert cen.item() == 0 and hard.item() == 0  # C = 1: the loss is 0, the bank still updates
    (cen + hard).backward()
    torch.testing.assert_close(memory.features[0], torch.tensor([0.714126, 0.628378, 0.308489], dtype=torch.float64),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(memory.features[1], torch.tensor([0.576557, 0.817057, 0], dtype=torch.float64),
                               atol=2e-6, rtol=0)


def test_update_order_second_call_updates_first():
    m0 = n(1, 0, 0)
    memory = hybrid([m0, m0])
    p, q = n(0, 1, 0), n(0, 0, 1)
    xp = p[None].clone().requires_grad_(True)
    xq = q[None].clone().requires_grad_(True)
    label = torch.zeros(1, dtype=torch.int64)
    grads = {}
    original = memory._update

    def spy(x, targets):
        grads.setdefault("bank_at_update", []).append(memory.features.clone())
        original(x, targets)

    memory._update = spy
    loss = sum(memory.terms(xp, label)) + sum(memory.terms(xq, label))
    loss.backward()
    after_q = F.normalize(ALPHA * m0 + (1 - ALPHA) * q, dim=0)
    expect = F.normalize(ALPHA * after_q + (1 - ALPHA) * p, dim=0)
    torch.testing.assert_close(memory.features[0], expect)
    # the q call ran its backward (and update) first; the p call saw the bank after q's update
    torch.testing.assert_close(grads["bank_at_update"][1][0], after_q)


def test_sequential_and_hard_k_options():
    m = n(1, 0, 0)
    x = torch.stack([n(0, 1, 0), n(0, 0, 1), n(1, 1, 0)])
    label = torch.zeros(3, dtype=torch.int64)
    seq = hybrid([m, m], centroid_update="sequential", hard_update="sequential")
    seq.terms(x.clone().requires_grad_(True), label)[0].backward()
    want = m
    for row in x:
        want = F.normalize(ALPHA * want + (1 - ALPHA) * row, dim=0)
    torch.testing.assert_close(seq.features[0], want)
    torch.testing.assert_close(seq.features[1], want)
    k2 = hybrid([m, m], hard_k=2)
    k2.terms(x.clone().requires_grad_(True), label)[0].backward()
    # similarities to the pre-update centroid: 0, 0, 0.707 -> the two lowest are rows 0 and 1
    torch.testing.assert_close(k2.features[1], F.normalize(ALPHA * m + (1 - ALPHA) * (x[0] + x[1]) / 2, dim=0))
    torch.testing.assert_close(k2.features[0], F.normalize(ALPHA * m + (1 - ALPHA) * x.mean(0), dim=0))
    for bad in (dict(centroid_update="x"), dict(hard_update="x"), dict(hard_k=0)):
        with pytest.raises(ValueError):
            HybridMemory(3, 1, **bad)


def test_dynamic_loss_min_own_max_others():
    memory = DynamicMemory(3, 2, num_instances=3, temp=TAU).double()
    memory.features = torch.stack([n(1, 0, 0), n(0, 1, 0), n(1, 1, 0), n(0, 1, 1), n(1, 0, 1), n(1, 1, 1)])
    q = torch.stack([n(2, 1, 0), n(0, 1, 2)])
    labels = torch.tensor([0, 1])
    assert memory(q, labels).item() == pytest.approx(3.314297, abs=2e-6)
    # literal: per (query, cluster) the min over own instances, the max over other clusters' instances
    z = torch.empty(2, 2, dtype=torch.float64)
    for b in range(2):
        for c in range(2):
            u = torch.stack([q[b] @ memory.features[c + 2 * i] / TAU for i in range(3)])
            z[b, c] = u.min() if c == labels[b] else u.max()
    torch.testing.assert_close(z, torch.tensor([[12.649111, 15.491933], [12.649111, 8.944272]],
                                               dtype=torch.float64), atol=2e-6, rtol=0)
    assert F.cross_entropy(z, labels).item() == pytest.approx(3.314297, abs=2e-6)
    before = memory.features.clone()
    memory.update_rows = False
    x = q.clone().requires_grad_(True)
    memory(x, labels).backward()
    assert torch.equal(memory.features, before) and x.grad is not None
