"""PCLHD: memories pinned to the spec's worked numbers (pclhd.md §10, computed with the official autograd functions),
loss terms against literal implementations of their equations, the method's schedule, branches and ablations."""

import math

import numpy as np
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


# ---------------------------------------------------------------------------------------------------- the method
from vireid_fast.config import load_config  # noqa: E402
from vireid_fast.methods import TrainBatch  # noqa: E402
from vireid_fast.methods.pclhd import PCLHD, all_modality_bank, draw_dynamic_rows  # noqa: E402
from vireid_fast.models import small_resnet  # noqa: E402
from vireid_fast.models.ema import EMAEncoder  # noqa: E402

from .context import make_context  # noqa: E402

VIS_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0])
IR_LABELS = torch.tensor([0, 0, 1, 1, 1, -1, 0, 1, 1])


def make_method(*overrides, name="pclhd", seed=0):
    torch.manual_seed(seed)
    model = small_resnet(widths=(8, 8, 8, 16))
    config = load_config(None, [f"method.name={name}", "method.stage1_epochs=2", "method.dpcl_instances=3",
                                "train.num_identities=2", "train.num_instances=2", "train.iters=3",
                                *overrides])
    g = torch.Generator().manual_seed(seed + 1)
    feats = {"visible": {"mean": F.normalize(torch.randn(12, 16, generator=g), dim=1) * 0.98},
             "infrared": {"mean": F.normalize(torch.randn(9, 16, generator=g), dim=1) * 0.98}}
    ema_feats = {m: {"mean": v["mean"] + 0.01} for m, v in feats.items()}
    context = make_context(model, config, extract=lambda encoder=None: ema_feats,
                           cameras=lambda modality: np.arange(12 if modality == "visible" else 9) % 3,
                           images=lambda modality, idx: torch.randint(0, 255, (len(list(idx)), 3, 32, 16),
                                                                      dtype=torch.uint8, generator=g))
    method = PCLHD if name == "pclhd" else __import__("vireid_fast.methods", fromlist=["get_method"]).get_method(name)
    method = method(config.method, context)
    if method.uses_ema:
        context.ema = EMAEncoder(model, 0.999, copy_buffers=False)
    return method, feats, ema_feats


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8, generator=g)
    return TrainBatch(images, torch.tensor([0, 0, 2, 2]), torch.arange(4), images.flip(0), torch.tensor([1, 1, 0, 0]),
                      torch.arange(4))


def prepare(method, feats, epoch):
    method.start_epoch(epoch)
    labels = {"visible": VIS_LABELS.clone(), "infrared": IR_LABELS.clone()}
    if method.stage == 2 and method.params.all_modality_branch:
        method.all_labels = torch.cat([torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0]),
                                       torch.tensor([0, 0, 1, 1, 1, -1, 3, 3, 3])])
    method.associate(feats, labels)
    method.build_memories(feats, labels)
    method.batch_sampler(labels, epoch)
    return labels


def test_banks_at_init():
    method, feats, ema_feats = make_method()
    prepare(method, feats, 2)
    for m, lab in (("visible", VIS_LABELS), ("infrared", IR_LABELS)):
        bank = getattr(method, f"hybrid_{m}").features
        c = int(lab.max()) + 1
        assert bank.shape == (2 * c, 16)
        assert torch.equal(bank[:c], bank[c:])
        for k in range(c):
            torch.testing.assert_close(bank[k], F.normalize(feats[m]["mean"][lab == k].mean(0), dim=0))
        dyn = getattr(method, f"dynamic_{m}").features
        assert dyn.shape == (3 * c, 16)
        torch.testing.assert_close(dyn.norm(dim=1), torch.ones(3 * c))
        members = F.normalize(ema_feats[m]["mean"], dim=1)
        for row in range(3 * c):  # row c + C i belongs to cluster c, never an outlier
            hit = torch.nonzero((members - dyn[row]).abs().amax(1) < 1e-6).flatten()
            assert hit.numel() and all(int(lab[h]) == row % c for h in hit)


def test_dynamic_rows_are_drawn_with_replacement_per_cluster():
    labels = torch.tensor([1, 0, -1, 1, 1, 0])
    rows = draw_dynamic_rows(labels, 2, 16, torch.Generator().manual_seed(0))
    assert rows.shape == (32,)
    assert (labels[rows].view(16, 2) == torch.tensor([0, 1])).all()
    assert set(rows[1::2].tolist()) == {0, 3, 4}  # 16 draws from 3 members cover them (with replacement)
    with pytest.raises(ValueError, match="needs a member"):
        draw_dynamic_rows(torch.tensor([0, 0, 2]), 3, 2, torch.Generator())


def test_all_modality_centres_and_lists():
    a = F.normalize(torch.randn(3, 4), dim=1)
    b = F.normalize(torch.randn(2, 4), dim=1)
    labels = torch.tensor([0, 0, 0, 1, -1])  # visible a0..a2 in cluster 0; infrared b0 in 0, b1 outlier
    vis, ir = torch.cat([a, b[:0]]), b
    labels = torch.tensor([0, 0, 0, 0, -1])
    centre, both = all_modality_bank(vis, ir, labels)
    torch.testing.assert_close(centre[0], F.normalize(0.5 * a.mean(0) + 0.5 * b[0], dim=0))
    assert both.tolist() == [True]
    method, feats, _ = make_method()
    prepare(method, feats, 2)
    lists = method._all_lists
    # cluster 3 is infrared-only: its images are not in the lists; outliers never
    assert lists["infrared"].tolist() == [0, 0, 1, 1, 1, -1, -1, -1, -1]
    assert lists["visible"].tolist() == [0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1, 0]
    assert method.hybrid_all.features.shape == (8, 16)


def spy_updates(method):
    """Record (bank, rows) of every hybrid-bank update in the order the backward runs them."""
    order = []

    def wrap(memory, name):
        original = memory._update

        def update(x, targets):
            order.append((name, x.shape[0]))
            original(x, targets)

        memory._update = update

    for m in ("visible", "infrared"):
        wrap(getattr(method, f"hybrid_{m}"), m)
    return order


def literal_stage_terms(method, f, y, modality):
    bank = getattr(method, f"hybrid_{modality}").features.clone().double()
    return literal_hybrid(f.double(), y, bank)


def test_stage1_step_equals_literal_hybrid_and_updates_in_reverse_order():
    method, feats, _ = make_method()
    prepare(method, feats, 0)
    assert method.stage == 1 and not method.dpcl_active
    order = spy_updates(method)
    captured = {}
    original = method._encode

    def encode(*args):
        out = original(*args)
        captured["f"] = out
        return out

    method._encode = encode
    expect = {}
    losses = method.training_step(batch())
    f_vis, f_ir, _ = captured["f"]
    expect["infrared"] = literal_stage_terms(method, f_ir.detach(), torch.tensor([1, 1, 0, 0]), "infrared")
    expect["visible"] = literal_stage_terms(method, f_vis.detach(), torch.tensor([0, 0, 2, 2] * 2), "visible")
    assert set(losses) == {"infrared", "visible"}
    for k in losses:
        assert losses[k].item() == pytest.approx(expect[k].item(), rel=1e-5)
    sum(losses.values()).backward()
    # RGB created after IR: its backward (and update) runs first
    assert [name for name, _ in order] == ["visible", "infrared"]


def test_stage2_cross_direction_by_parity_and_update_order():
    for epoch, target in ((2, "infrared"), (3, "visible")):
        method, feats, _ = make_method("method.all_modality_branch=false")
        prepare(method, feats, epoch)
        assert method.stage2_epoch == epoch - 2 and method.match is not None
        order = spy_updates(method)
        losses = method.training_step(batch())
        assert set(losses) == {"infrared", "visible", "cross"}
        sum(losses.values()).backward()
        queries = 8 if target == "infrared" else 4  # visible queries are both views
        assert order[0] == (target, queries)  # cross first, then RGB, then IR
        assert [name for name, _ in order[1:]] == ["visible", "infrared"]
        assert "dpcl" in method.ctx.logged_values


def test_dpcl_default_is_inert_but_ema_bn_statistics_move():
    grads = {}
    for dpcl in (True, False):
        method, feats, _ = make_method("method.all_modality_branch=false", f"method.dpcl={str(dpcl).lower()}")
        prepare(method, feats, 2)
        dyn_before = method.dynamic_visible.features.clone()
        if dpcl:
            ema_bn = method.ctx.ema.module.bnneck.running_mean.clone()
        losses = method.training_step(batch())
        assert "dpcl" not in losses
        sum(losses.values()).backward()
        grads[dpcl] = [p.grad.clone() for p in method.ctx.encoder.parameters() if p.grad is not None]
        if dpcl:
            assert torch.equal(method.dynamic_visible.features, dyn_before)
            assert not torch.equal(method.ctx.ema.module.bnneck.running_mean, ema_bn)
            assert len(method.ctx.logged_values["dpcl"]) == 1
        else:
            assert method.ctx.ema is None and "dpcl" not in method.ctx.logged_values
    assert len(grads[True]) == len(grads[False])
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))


def test_dpcl_online_trains_and_overwrite_writes_ema_rows():
    method, feats, _ = make_method("method.all_modality_branch=false", "method.dpcl_query=online",
                                   "method.dpcl_memory_update=overwrite")
    prepare(method, feats, 2)
    before = method.dynamic_infrared.features.clone()
    losses = method.training_step(batch())
    assert losses["dpcl"].requires_grad
    sum(losses.values()).backward()
    after = method.dynamic_infrared.features
    assert not torch.equal(after, before)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(after.shape[0]))
    assert all(p.grad is None for p in method.ctx.ema.module.parameters())


def test_second_optimiser_step_and_all_modality_terms():
    method, feats, _ = make_method()
    steps = []
    method.ctx.backward_step = lambda loss: steps.append(sorted(method.ctx.logged_values))
    prepare(method, feats, 2)
    losses = method.training_step(batch())
    assert set(losses) == {"all_infrared", "all_visible"} and len(steps) == 1
    assert {"step_a/infrared", "step_a/visible", "step_a/cross", "dpcl"} <= set(method.ctx.logged_values)


def test_stage2_restarts_the_optimiser_once_unless_switched_off():
    for restart in (True, False):
        method, _, _ = make_method(f"method.restart_optimizer={str(restart).lower()}")
        calls = []
        method.ctx.restart_optimizer = lambda calls=calls, method=method: calls.append(method.epoch)
        for epoch in range(4):
            method.start_epoch(epoch)
        assert calls == ([2] if restart else [])


def test_stage_switch_copies_online_into_ema():
    method, feats, _ = make_method()
    with torch.no_grad():
        for p in method.ctx.encoder.parameters():
            p.add_(0.5)
    method.start_epoch(1)
    assert not torch.equal(next(method.ctx.ema.module.parameters()), next(method.ctx.encoder.parameters()))
    method.start_epoch(2)
    for a, b in zip(method.ctx.ema.module.state_dict().values(), method.ctx.encoder.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert method.eval_encoder() is method.ctx.ema.module


@pytest.mark.parametrize("switch,removed", [
    ("method.hpcl=false", "hybrid"), ("method.dpcl=false", "dpcl"), ("method.all_modality_branch=false", "all"),
    ("method.cross_weight=0", "cross")])
def test_ablation_switches_remove_exactly_their_terms(switch, removed):
    method, feats, _ = make_method(switch)
    method.ctx.backward_step = lambda loss: None
    prepare(method, feats, 2)
    losses = method.training_step(batch())
    logged = set(method.ctx.logged_values)
    step_a = {k.split("/")[1] for k in logged if k.startswith("step_a/")} if removed != "all" else set(losses)
    expect_a = {"infrared", "visible", "cross"} - ({"cross"} if removed == "cross" else set())
    assert step_a == expect_a
    assert ("dpcl" in logged) == (removed != "dpcl")
    assert (set(losses) == {"all_infrared", "all_visible"}) == (removed != "all")
    assert (method.hybrid_visible.features.shape[0] == 0) == (removed == "hybrid")
    assert (method.centroid_visible.shape[0] == 0) == (removed != "hybrid")


def test_progressive_off_starts_dpcl_at_epoch_zero():
    method, feats, _ = make_method("method.progressive=false")
    prepare(method, feats, 0)
    assert method.stage == 1 and method.dpcl_active
    method.training_step(batch())
    assert "dpcl" in method.ctx.logged_values and "cross" not in method.ctx.logged_values


def literal_ce(f, y, rows):
    f = f / f.norm(dim=1, keepdim=True)
    z = f @ rows.T / TAU
    return sum(torch.logsumexp(z[b], 0) - z[b, int(y[b])] for b in range(f.shape[0])) / f.shape[0]


def test_paper_preset_stage_totals():
    method, feats, _ = make_method(name="pclhd_paper")
    prepare(method, feats, 0)
    banks = {m: getattr(method, f"hybrid_{m}").features.clone() for m in ("visible", "infrared")}
    captured = {}
    original = method._encode
    method._encode = lambda *a: captured.setdefault("f", original(*a))
    s1 = method.training_step(batch())
    f_vis, f_ir, _ = captured["f"]
    assert set(s1) == {"infrared", "visible"}  # stage 1: CPCL only, centroid rows
    c_ir = banks["infrared"].shape[0] // 2
    assert s1["infrared"].item() == pytest.approx(literal_ce(f_ir.detach(), [1, 1, 0, 0], banks["infrared"][:c_ir])
                                                  .item(), rel=1e-5)
    method2, feats2, _ = make_method(name="pclhd_paper")
    prepare(method2, feats2, 2)
    banks = {m: getattr(method2, f"hybrid_{m}").features.clone() for m in ("visible", "infrared")}
    captured.clear()
    original = method2._encode
    method2._encode = lambda *a: captured.setdefault("f", original(*a))
    s2 = method2.training_step(batch())
    f_vis, f_ir, _ = captured["f"]
    assert set(s2) == {"infrared", "visible", "cross", "dpcl"}
    c_vis = banks["visible"].shape[0] // 2
    assert s2["visible"].item() == pytest.approx(
        0.5 * literal_ce(f_vis.detach(), [0, 0, 2, 2] * 2, banks["visible"][c_vis:]).item(), rel=1e-5)
    assert s2["dpcl"].item() == pytest.approx(0.5 * method2.ctx.logged_values["dpcl"][0], rel=1e-5)
    method3, feats3, _ = make_method("method.lambda_hard=1.0", name="pclhd_paper")
    prepare(method3, feats3, 2)
    assert "dpcl" not in method3.training_step(batch())  # lambda = 1 removes DPCL exactly


# ---------------------------------------------------------------------------------------------------- in the engine
from tests.engine.tiny import assert_same_state, resume_after_kill, tiny_config, tiny_root  # noqa: E402

ENGINE = ("method.stage1_epochs=1", "method.dpcl_instances=2", "method.all_k1=6", "method.all_k2=2",
          "eval.eval_untrained=false", "cluster.eps=0.8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_root(tmp_path_factory)


@pytest.mark.parametrize("name", ["pclhd", "pclhd_paper", "swpcl"])
def test_trains_in_the_engine_and_resumes_bit_exact(tiny, tmp_path, monkeypatch, name):
    import json

    from vireid_fast.engine.trainer import Trainer

    def quiet(*args, **kwargs):
        pass

    overrides = (f"method.name={name}", *ENGINE, "train.epochs=3", "train.step_size=1", "train.gamma=0.5")
    full = Trainer(tiny_config(str(tmp_path / "full"), *overrides), data_root=tiny, log=quiet, progress=False)
    lr = full.config.train.lr
    full.fit()
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["stage"] for r in rows if "stage" in r] == [1.0, 2.0, 2.0]
    # stage 2 restarts Adam and the schedule (halved every epoch here): lr, then lr again, then lr / 2
    assert [r["lr"] for r in rows if "stage" in r] == pytest.approx([lr, lr, lr / 2])
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    if name == "pclhd":  # stage 2 ran its second optimiser step on the all-modality clusters
        assert "loss/all_visible" in rows[-1] and "value/step_a/cross" in rows[-1] and "value/dpcl" in rows[-1]
    resumed = resume_after_kill(tiny, str(tmp_path / "killed"), overrides, 2, monkeypatch, quiet)
    resumed.fit()
    assert_same_state((full.encoder, resumed.encoder), (full.method, resumed.method))
    if full.ema is not None:
        assert_same_state((full.ema.module, resumed.ema.module))


def test_reported_space_maps_infrared_clusters_through_the_pgm_match():
    # Reporting only: stage 1 links nothing; in stage 2 every infrared cluster takes the visible cluster PGM matched
    # it to, so the engine's cross-modality pair precision/recall scores the association.
    method, feats, _ = make_method("method.all_modality_branch=false")
    labels = prepare(method, feats, 0)
    assert method.shared_label_spaces(labels) == {}
    labels = prepare(method, feats, 2)
    linked_v, linked_r = method.shared_label_spaces(labels)[""]
    assert torch.equal(linked_v, labels["visible"])
    table = method.match.infrared_to_visible
    expect = torch.tensor([int(table[y]) if y >= 0 else -1 for y in labels["infrared"].tolist()])
    assert torch.equal(linked_r, expect)
    assert (linked_r >= 0).any() and not torch.equal(linked_r, labels["infrared"])


def test_camera_aware_sampler_by_default_identity_on_request():
    from vireid_fast.data import CameraAwareSampler, IdentityBalancedSampler

    for kind, cls in (("camera", CameraAwareSampler), ("identity", IdentityBalancedSampler)):
        method, feats, _ = make_method("method.all_modality_branch=false", f"method.sampler={kind}")
        method.start_epoch(0)
        labels = {"visible": VIS_LABELS.clone(), "infrared": IR_LABELS.clone()}
        samplers = method.batch_sampler(labels, 0)
        assert all(isinstance(s, cls) for s in samplers.values())
        for m, sampler in samplers.items():
            batches = list(sampler)
            assert len(batches) == method.ctx.config.train.iters
            assert all(labels[m][i] >= 0 for b in batches for i in b)
