"""SALCR (spec shared/spec/methods/salcr.md): the part head against Eq. 9-11 written out, the nine-family routing,
every loss term against a literal per-row implementation (values and gradients), memory update rule and order,
DAGL against the community drop-in and a literal argmax, the pair sampler, the ablation switches, and the engine."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vireid_fast.methods import TrainBatch
from vireid_fast.methods.salcr import (
    FAMILIES,
    SALCR,
    PartHead,
    cluster_term,
    dagl_associate,
    positive_set_terms,
    top_k_mask,
)
from vireid_fast.ops.sinkhorn import sinkhorn_reference_stop

from .context import make_context

TAU, MU = 0.05, 0.1


class FakeEncoder(nn.Module):
    """stage4 = a 1x1 convolution of the image (identity for d = 3), feature = BN_g(spatial mean)."""

    def __init__(self, d=3):
        super().__init__()
        self.feature_dim = d
        self.proj = nn.Conv2d(3, d, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(3, d).t()[:, :, None, None] if d == 3 else torch.randn(d, 3, 1, 1))
        self.bn = nn.BatchNorm1d(d)

    def forward(self, images, modality, outputs=None):
        maps = self.proj(images.float())
        feat = self.bn(maps.mean((2, 3)))
        return feat if outputs is None else {"stage4": maps, "feature": feat}


def make_method(*overrides, d=3, name="salcr"):
    from vireid_fast.config import load_config

    config = load_config(None, [f"method.name={name}", *overrides])
    model = FakeEncoder(d)
    method = SALCR(config.method, make_context(model, config=config)) if name == "salcr" else \
        type(SALCR).__call__(__import__("vireid_fast.methods", fromlist=["x"]).get_method(name),
                             config.method, make_context(model, config=config))
    method.start_epoch(method.params.stage1_epochs)  # stage 2
    return method


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------------- part head
def test_part_split_is_row_major_with_remainder_dropped():
    maps = torch.arange(162.0).reshape(1, 1, 18, 9)  # pixel value = its flattened index h W + w
    parts = PartHead(1, 3).split(maps)
    assert parts.shape == (1, 3, 54, 1)
    for p in range(3):
        assert parts[0, p, :, 0].tolist() == list(range(54 * p, 54 * (p + 1)))
    four = PartHead(1, 4).split(maps)
    assert four.shape == (1, 4, 40, 1) and four[0, 3, -1, 0].item() == 159.0  # pixels 160, 161 unused
    with pytest.raises(ValueError, match="num_parts"):
        PartHead(1, 200).split(maps)


def test_query_eq9_and_attention_eq10_11_against_literal():
    torch.manual_seed(0)
    head = PartHead(4, 2).double()
    parts = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    q = head.queries(parts)
    for b in range(3):
        for p in range(2):
            alpha = [1 / (1 + math.exp(-float(head.prototypes[p].detach() @ parts[b, p, px]))) for px in range(5)]
            literal = sum(a * parts[b, p, px] for px, a in enumerate(alpha)) / sum(alpha)
            torch.testing.assert_close(q[b, p], literal)
    with torch.no_grad():
        head.prototypes.zero_()
    torch.testing.assert_close(head.queries(parts), parts.mean(2))  # sigma(0) is uniform
    target = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    f = head.attend(q, target)
    for b in range(3):
        for p in range(2):
            beta = torch.softmax(torch.stack([q[b, p] @ target[b, p, px] for px in range(5)]) / 2.0, 0)  # sqrt(4)
            torch.testing.assert_close(f[b, p], (beta[:, None] * target[b, p]).sum(0))
    torch.testing.assert_close(head.attend(torch.zeros(3, 2, 4, dtype=torch.float64), target), target.mean(2))


def test_query_gradient_reaches_prototypes_through_another_map():
    torch.manual_seed(1)
    head = PartHead(4, 1)
    v_map, r_map = torch.randn(1, 1, 6, 4, requires_grad=True), torch.randn(1, 1, 6, 4)
    f_rv = head.attend(head.queries(v_map), r_map)  # query of v on r's map: queries are not detached
    f_rv.sum().backward()
    assert head.prototypes.grad.abs().sum() > 0 and v_map.grad.abs().sum() > 0


def identity_bn(method):
    bn = method.part_head.bn
    with torch.no_grad():
        bn.weight.fill_(1.0)
    bn.eval()


def const_images(values, h=6, w=3):
    return torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, h, w).contiguous()


def test_nine_family_routing_and_the_ra_slot():
    method = make_method("method.num_parts=2", d=3)
    identity_bn(method)
    s = 2
    v, r = const_images([10, 20]), const_images([30, 40])
    gv, ga, gr, fam = method.encode_pairs(v, r)
    assert gv.shape == ga.shape == gr.shape == (s, 3)
    # a constant map pools to its value whatever the query: the family's value names its source map
    value = {"v": torch.tensor([10.0, 20.0]) / 255, "a": torch.tensor([10.0, 20.0]) / 255,
             "r": torch.tensor([30.0, 40.0]) / 255}
    scale = 1 / math.sqrt(1 + method.part_head.bn.eps)
    for m, q in FAMILIES:
        assert fam[m + q].shape == (s, 2, 3)
        torch.testing.assert_close(fam[m + q][:, 0, 0], value[m] * scale, msg=m + q)
    # the query's source: a map varying along the part; the query of v on r's map differs from r's own query
    v2 = torch.randint(0, 255, (s, 3, 6, 3), dtype=torch.uint8)
    v2[:] = v2[:, :1]  # equal channels survive the channel exchange of the augmented copy
    r2 = torch.randint(0, 255, (s, 3, 6, 3), dtype=torch.uint8)
    r2[:] = r2[:, :1]
    _, _, _, fam2 = method.encode_pairs(v2, r2)
    head = method.part_head
    maps = {k: head.split(method.ctx.model(x.float() / 255, 0, outputs=("stage4", "feature"))["stage4"])
            for k, x in (("v", v2), ("r", r2))}
    maps["a"] = maps["v"]
    q = {k: head.queries(maps[k]) for k in "var"}
    for m, qn in FAMILIES:
        torch.testing.assert_close(fam2[m + qn], head.bn(head.attend(q[qn], maps[m]).reshape(s, -1)).reshape(s, 2, 3))
    # ra_slot: slot 4 of V_p is f^{va} (reference) or f^{ra} (fixed) — visible through the FGSAL value
    torch.manual_seed(3)
    fam3 = {k: torch.randn(s, 2, 3) for k in fam}
    set_banks(method, kv=3, kr=2, n_v=6, n_r=5, d=3, num_parts=2)
    y = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 0])
    ref = method.fgsal_loss(fam3, *y)
    method.params.ra_slot = "fixed"
    fixed = method.fgsal_loss(fam3, *y)
    assert not torch.isclose(ref, fixed)
    fam4 = dict(fam3, ra=fam3["va"])
    torch.testing.assert_close(method.fgsal_loss(fam4, *y), ref)


def test_bn_p_runs_three_times_and_bn_g_once_per_step():
    method = make_method("method.num_parts=3", d=3)
    set_banks(method, kv=3, kr=2, n_v=6, n_r=5, d=3, num_parts=3)
    before_p = int(method.part_head.bn.num_batches_tracked)
    before_g = int(method.ctx.model.bn.num_batches_tracked)
    method.training_step(pair_batch(method))
    assert int(method.part_head.bn.num_batches_tracked) == before_p + 3
    assert int(method.ctx.model.bn.num_batches_tracked) == before_g + 1


def test_stage2_recreates_the_part_head_once():
    method = make_method(d=3)
    head = method.part_head
    with torch.no_grad():
        head.prototypes.zero_()
        head.bn.running_mean.fill_(5.0)
    method.start_epoch(method.params.stage1_epochs + 1)  # a later stage-2 epoch keeps the trained head
    assert head.prototypes.abs().sum() == 0 and head.bn.running_mean[0] == 5.0
    method.start_epoch(method.params.stage1_epochs)
    assert head.prototypes.abs().sum() > 0 and head.bn.running_mean.abs().sum() == 0
    assert abs(float(head.prototypes.std()) - math.sqrt(2 / 3)) < 0.8  # Kaiming normal, std sqrt(2 / d)
    assert head.bn.bias.abs().sum() == 0 and not head.bn.bias.requires_grad


def test_eval_embedding_parts_first_global_last_without_moving_bn_p():
    method = make_method("method.num_parts=2", d=3)
    method.part_head.train()
    stats = method.part_head.bn.running_mean.clone(), int(method.part_head.bn.num_batches_tracked)
    model = method.ctx.model.eval()
    images = torch.rand(4, 3, 6, 3)
    out = method.embed(model, images, 0)
    assert torch.equal(method.part_head.bn.running_mean, stats[0])
    assert int(method.part_head.bn.num_batches_tracked) == stats[1] and method.part_head.training
    full = model(images, 0, outputs=("stage4", "feature"))
    method.part_head.eval()
    torch.testing.assert_close(out["pg"][:, :6], method.part_head.own(full["stage4"]).flatten(1))
    torch.testing.assert_close(out["pg"][:, 6:], full["feature"])
    torch.testing.assert_close(out["feature"], full["feature"])


# ------------------------------------------------------------------------------------------------- memories
def set_banks(method, kv, kr, n_v, n_r, d, num_parts, seed=0):
    method.memory_visible = unit(kv, d, seed=seed)
    method.memory_infrared = unit(kr, d, seed=seed + 1)
    method.part_vv, method.part_rv = unit(num_parts, kv, d, seed=seed + 2), unit(num_parts, kv, d, seed=seed + 3)
    method.part_vr, method.part_rr = unit(num_parts, kr, d, seed=seed + 4), unit(num_parts, kr, d, seed=seed + 5)
    method.instance_v, method.instance_r = unit(n_v, d, seed=seed + 6), unit(n_r, d, seed=seed + 7)
    method.instance_vp = unit(num_parts, n_v, d, seed=seed + 8)
    method.instance_rp = unit(num_parts, n_r, d, seed=seed + 9)
    method.intra_visible = torch.tensor([0, 1, 2, 0])
    method.cross_visible = torch.tensor([1, 0, 1, 0])
    method.intra_infrared = torch.tensor([1, 0, 1])
    method.cross_infrared = torch.tensor([0, 1, 2])
    method.row_visible, method.row_infrared = torch.arange(4), torch.arange(3)


def pair_batch(method):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 255, (4, 3, 6, 3), dtype=torch.uint8, generator=g)
    return TrainBatch(images[:2], torch.tensor([0, 1]), torch.tensor([0, 1]), images[2:], torch.tensor([1, 0]),
                      torch.tensor([0, 2]))


def literal_ce_rows(x, y, bank):
    xn = x / x.norm(dim=1, keepdim=True)
    return torch.stack([-torch.log_softmax(xn[i] @ bank.t() / TAU, 0)[y[i]] for i in range(len(y))])


def literal_update(bank, x, y, order):
    bank = bank.clone()
    for i in order:
        v = MU * bank[y[i]] + (1 - MU) * x[i] / x[i].norm()
        bank[y[i]] = v / v.norm()
    return bank


def test_cluster_term_value_gradient_and_shuffled_update_order():
    torch.manual_seed(0)
    bank = unit(3, 4).contiguous()
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 2, 2, 1, 2])  # label 2 three times: its updates chain
    order = torch.tensor([3, 1, 4, 0, 2])
    old = bank.clone()
    loss = cluster_term(x, y, bank, torch.zeros(5, dtype=torch.long), temp=TAU, momentum=MU, norm="reference",
                        order=order)
    x64 = x.detach().double().requires_grad_(True)
    ref = literal_ce_rows(x64, y, old.double()).mean()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bank, old)  # nothing moves before backward
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)  # gradient with the pre-update bank
    torch.testing.assert_close(bank.double(), literal_update(old.double(), x64.detach(), y, order.tolist()),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(3))
    # a different order gives a different bank (the order matters with repeated labels)
    bank2 = old.clone()
    cluster_term(x.detach().requires_grad_(True), y, bank2, torch.zeros(5, dtype=torch.long), temp=TAU, momentum=MU,
                 norm="reference", order=None).backward()
    torch.testing.assert_close(bank2.double(), literal_update(old.double(), x64.detach(), y, range(5)), atol=1e-6,
                               rtol=1e-5)
    assert not torch.allclose(bank2, bank)


def test_global_loss_routing_norms_and_branches():
    method = make_method("method.shuffle_updates=false", d=4)
    kv, kr, s = 3, 2, 2
    method.memory_visible, method.memory_infrared = unit(kv, 4, seed=1), unit(kr, 4, seed=2)
    torch.manual_seed(4)
    gv, ga, gr = (torch.randn(s, 4, dtype=torch.float64) for _ in range(3))
    yv, yv_x, yr, yr_x = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([2, 1])
    mv, mr = method.memory_visible.double().clone(), method.memory_infrared.double().clone()
    x = torch.cat([gv, ga, gr])
    rows_v = literal_ce_rows(x, torch.cat([yv, yv, yr_x]), mv)
    rows_r = literal_ce_rows(x, torch.cat([yv_x, yv_x, yr]), mr)
    with torch.no_grad():
        got = method.global_loss(gv, ga, gr, yv, yv_x, yr, yr_x)
    torch.testing.assert_close(got.double(), rows_v.mean() + rows_r.mean(), atol=1e-5, rtol=1e-5)
    method.params.loss_norm = "paper"  # four means: v/a rows and r rows on each memory
    with torch.no_grad():
        got = method.global_loss(gv, ga, gr, yv, yv_x, yr, yr_x)
    paper = rows_v[:4].mean() + rows_v[4:].mean() + rows_r[:4].mean() + rows_r[4:].mean()
    torch.testing.assert_close(got.double(), paper, atol=1e-5, rtol=1e-5)
    method.params.loss_norm = "reference"
    method.params.branch = "visible"  # M^r term: only the IR rows with their intra labels
    with torch.no_grad():
        got = method.global_loss(gv, ga, gr, yv, yv_x, yr, yr_x)
    torch.testing.assert_close(got.double(), rows_v.mean() + rows_r[4:].mean(), atol=1e-5, rtol=1e-5)
    method.params.branch = "infrared"  # M^v term: only the v and a rows with their intra labels
    with torch.no_grad():
        got = method.global_loss(gv, ga, gr, yv, yv_x, yr, yr_x)
    torch.testing.assert_close(got.double(), rows_v[:4].mean() + rows_r.mean(), atol=1e-5, rtol=1e-5)


def test_fgsal_against_literal_eq12_15_values_and_gradients():
    method = make_method("method.num_parts=2", "method.shuffle_updates=false", d=4)
    s, kv, kr = 2, 3, 2
    set_banks(method, kv=kv, kr=kr, n_v=5, n_r=4, d=4, num_parts=2)
    banks = {k: getattr(method, k).double().clone() for k in ("part_vv", "part_vr", "part_rv", "part_rr")}
    torch.manual_seed(7)
    fam = {m + q: torch.randn(s, 2, 4, dtype=torch.float64, requires_grad=True) for m, q in FAMILIES}
    yv, yv_x, yr, yr_x = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([2, 1])
    got = method.fgsal_loss(fam, yv, yv_x, yr, yr_x)
    got.backward()
    grads = {k: torch.zeros_like(t) if t.grad is None else t.grad.clone() for k, t in fam.items()}
    lit_fam = {k: t.detach().clone().requires_grad_(True) for k, t in fam.items()}
    total = 0
    for p in range(2):
        vrows = torch.cat([lit_fam[k][:, p] for k in ("vv", "aa", "rv", "va", "av", "va")])  # the code's slot bug
        rrows = torch.cat([lit_fam[k][:, p] for k in ("rr", "vr", "ar")])
        total = total + (literal_ce_rows(vrows, yv.repeat(6), banks["part_vv"][p]).mean()
                         + literal_ce_rows(vrows, yv_x.repeat(6), banks["part_vr"][p]).mean()  # K^r rows (Eq. 13)
                         + literal_ce_rows(rrows, yr_x.repeat(3), banks["part_rv"][p]).mean()
                         + literal_ce_rows(rrows, yr.repeat(3), banks["part_rr"][p]).mean())
    total = total / 2
    torch.testing.assert_close(got.double(), total, atol=1e-5, rtol=1e-5)
    total.backward()
    for k in fam:
        lit = torch.zeros_like(grads[k]) if lit_fam[k].grad is None else lit_fam[k].grad
        torch.testing.assert_close(grads[k], lit, atol=1e-5, rtol=1e-4, msg=k)
    assert grads["ra"].abs().sum() == 0  # f^{ra} never enters with ra_slot=reference


# ------------------------------------------------------------------------------------------------- GPCR
def literal_topk(x, bank, k):
    sims = (x / x.norm()) @ bank.t()
    if bank.shape[0] <= k:
        return set(range(bank.shape[0]))
    kth1 = sorted(sims.tolist(), reverse=True)[k]
    return {i for i, v in enumerate(sims.tolist()) if v > kth1}


def literal_ps(x, bank, positives):
    prob = torch.softmax((x / x.norm()) @ bank.t() / TAU, 0)
    return -torch.log(sum(prob[i] for i in positives))


def test_top_k_mask_ties_are_not_broken():
    bank = F.normalize(torch.tensor([[1.0, 0], [1, 0], [0.6, 0.8], [0, 1]]), dim=1)
    x = torch.tensor([[1.0, 0.0]])
    assert top_k_mask(x, bank, 1)[0].tolist() == [False, False, False, False]  # two rows tie for first
    assert top_k_mask(x, bank, 2)[0].tolist() == [True, True, False, False]
    assert top_k_mask(x, bank, 4)[0].all()


def test_positive_set_terms_empty_rows_are_zero_and_not_nan():
    logits = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0] * 5, [0, 0, 0, 0, 1]], dtype=torch.bool)
    per_row, valid = positive_set_terms(logits, mask)
    assert valid.tolist() == [True, False, True] and per_row[1] == 0
    torch.testing.assert_close(per_row[0], -torch.log(torch.softmax(logits[0], 0)[[0, 2]].sum()))
    per_row.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0


@pytest.mark.parametrize("views", [3, 2])
def test_gpcr_global_against_literal_sets(views):
    method = make_method(f"method.gpcr_global_views={views}", "method.k_instance=3", d=4)
    set_banks(method, kv=3, kr=2, n_v=8, n_r=7, d=4, num_parts=1)
    torch.manual_seed(11)
    gv, ga, gr = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = method.gpcr_global_loss(gv, ga, gr)
    total = 0
    for bank in (method.instance_v.double(), method.instance_r.double()):
        rows = []
        for j in range(2):
            sets = [literal_topk(t[j].detach(), bank, 3) for t in ((gv, gr, ga) if views == 3 else (gv, gr))]
            pos = set.intersection(*sets)
            if pos:
                rows += [literal_ps(t[j], bank, sorted(pos)) for t in (gv, ga, gr)]
        total = total + (torch.stack(rows).mean() if rows else 0)
    torch.testing.assert_close(got.double(), total, atol=1e-5, rtol=1e-5)


def test_gpcr_all_empty_gives_zero_and_counts():
    method = make_method("method.k_instance=1", d=2)
    set_banks(method, kv=2, kr=2, n_v=4, n_r=4, d=2, num_parts=1)
    method.instance_v = F.normalize(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]), dim=1)
    method.instance_r = method.instance_v.clone()
    gv = torch.tensor([[1.0, 0.01], [0.01, 1]], requires_grad=True)
    gr = torch.tensor([[-1.0, 0.01], [0.01, -1]], requires_grad=True)  # top-1 sets disjoint from gv's
    loss = method.gpcr_global_loss(gv, gv, gr)
    assert loss.item() == 0.0 and method._empty_events == 2
    loss.backward()
    assert torch.isfinite(gv.grad).all()


def test_gpcr_part_against_literal_sets_k1():
    method = make_method("method.num_parts=2", "method.k_instance=2", d=4)
    set_banks(method, kv=3, kr=2, n_v=6, n_r=5, d=4, num_parts=2)
    torch.manual_seed(13)
    s = 2
    glob = {k: torch.randn(s, 4, dtype=torch.float64) for k in "var"}
    fam = {m + q: torch.randn(s, 2, 4, dtype=torch.float64, requires_grad=True) for m, q in FAMILIES}
    got = method.gpcr_part_loss(glob["v"], glob["a"], glob["r"], fam)
    eff = dict(fam, ra=fam["va"])  # the r-map block's query-a rows are f^{va} (reference slot)
    total = 0
    for p in range(2):
        for bank_g, bank_p in ((method.instance_v.double(), method.instance_vp[p].double()),
                               (method.instance_r.double(), method.instance_rp[p].double())):
            rows = []
            for m, q in FAMILIES:
                others = [o for o in "var" if o != m]
                for j in range(s):
                    pos = literal_topk(glob[q][j], bank_g, 2) & (
                        literal_topk(eff[others[0] + q][j, p].detach(), bank_p, 2)
                        | literal_topk(eff[others[1] + q][j, p].detach(), bank_p, 2))
                    if pos:
                        rows.append(literal_ps(eff[m + q][j, p], bank_p, sorted(pos)))
            total = total + (torch.stack(rows).mean() if rows else 0)
    torch.testing.assert_close(got.double(), total / 2, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- step
def test_each_bank_updated_once_instance_banks_read_only(monkeypatch):
    import vireid_fast.methods.salcr as module

    method = make_method("method.num_parts=2", d=3)
    set_banks(method, kv=3, kr=3, n_v=6, n_r=5, d=3, num_parts=2)
    calls = []
    real = module.memory_update

    def spy(x, y, memory, **kwargs):
        calls.append(memory.data_ptr())
        return real(x, y, memory, **kwargs)

    monkeypatch.setattr(module, "memory_update", spy)
    instance = {k: getattr(method, k).clone() for k in ("instance_v", "instance_r", "instance_vp", "instance_rp")}
    losses = method.training_step(pair_batch(method))
    assert set(losses) == {"global", "fgsal", "gpcr_global", "gpcr_part"}
    sum(losses.values()).backward()
    expected = [method.memory_visible.data_ptr(), method.memory_infrared.data_ptr()]
    for name in ("part_vv", "part_vr", "part_rv", "part_rr"):
        expected += [getattr(method, name)[p].data_ptr() for p in range(2)]
    assert sorted(calls) == sorted(expected)  # 2 + 4 Np banks, once each
    for k, v in instance.items():
        assert torch.equal(getattr(method, k), v), k


def test_instance_momentum_option_moves_own_rows():
    method = make_method("method.instance_memory_update=momentum", d=3, name="salcr")
    set_banks(method, kv=3, kr=3, n_v=6, n_r=5, d=3, num_parts=3)
    before_v, before_r = method.instance_v.clone(), method.instance_r.clone()
    batch = pair_batch(method)
    sum(method.training_step(batch).values()).backward()
    changed_v = (method.instance_v != before_v).any(1).nonzero().flatten().tolist()
    changed_r = (method.instance_r != before_r).any(1).nonzero().flatten().tolist()
    assert changed_v == [0, 1] and changed_r == [0, 2]  # the batch's rows only


@pytest.mark.parametrize("overrides, removed", [
    (("method.fgsal=false",), {"fgsal"}),
    (("method.gpcr=false",), {"gpcr_global", "gpcr_part"}),
    (("method.lambda_gpcr=0",), {"gpcr_global", "gpcr_part"}),
    (("method.gpcr_terms=global",), {"gpcr_part"}),
    (("method.gpcr_terms=part",), {"gpcr_global"}),
])
def test_ablation_switches_remove_exactly_their_terms(overrides, removed):
    torch.manual_seed(0)
    full = make_method("method.k_instance=2", d=3)
    set_banks(full, kv=3, kr=3, n_v=6, n_r=5, d=3, num_parts=3)
    torch.manual_seed(0)
    ref = {k: v.detach() for k, v in full.training_step(pair_batch(full)).items()}
    torch.manual_seed(0)
    ablated = make_method("method.k_instance=2", *overrides, d=3)
    set_banks(ablated, kv=3, kr=3, n_v=6, n_r=5, d=3, num_parts=3)
    torch.manual_seed(0)
    got = {k: v.detach() for k, v in ablated.training_step(pair_batch(ablated)).items()}
    assert set(ref) - set(got) == removed
    for k in got:
        torch.testing.assert_close(got[k], ref[k], msg=k)
    assert ref["gpcr_global"] != 0


def test_total_weights_gpcr_by_lambda():
    torch.manual_seed(0)
    a = make_method("method.lambda_gpcr=0.5", "method.k_instance=2", d=3)
    torch.manual_seed(0)
    b = make_method("method.lambda_gpcr=2.0", "method.k_instance=2", d=3)
    for m in (a, b):
        set_banks(m, kv=3, kr=3, n_v=6, n_r=5, d=3, num_parts=3)
    torch.manual_seed(0)
    la = a.training_step(pair_batch(a))
    torch.manual_seed(0)
    lb = b.training_step(pair_batch(b))
    for k in ("gpcr_global", "gpcr_part"):
        torch.testing.assert_close(lb[k], 4 * la[k])


# ------------------------------------------------------------------------------------------------- DAGL
def test_reference_stop_rule_matches_community_solver_and_iteration_count():
    from vireid_fast.compat._association import sinkhorn_solver

    torch.manual_seed(0)
    cost = torch.rand(40, 7) * 2
    plan, steps = sinkhorn_reference_stop(cost, 5.0)
    community = sinkhorn_solver(cost, lambda_sk=5.0)
    torch.testing.assert_close(plan, community)
    assert steps % 10 == 1 or steps == 500
    _, steps2 = sinkhorn_reference_stop(cost, 5.0, tol=0.0, max_iter=7)
    assert steps2 == 7
    with pytest.raises(ValueError, match="underflows"):
        sinkhorn_reference_stop(torch.full((3, 2), 100.0), 50.0)


class Args:
    part_num, lambda_ot = 0, 5


@pytest.mark.parametrize("use_cmfp", [True, False])
def test_dagl_equals_the_community_association(use_cmfp, capsys):
    from vireid_fast.compat.salcr import part_ot

    torch.manual_seed(2)
    ids_v, ids_r = torch.arange(30) % 5, torch.arange(18) % 3  # more clusters visible (5) than infrared (3)
    centres = F.normalize(torch.randn(5, 16), dim=1)
    fv = F.normalize(centres[ids_v] + 0.4 * torch.randn(30, 16), dim=1)
    fr = F.normalize(centres[ids_r] + 0.4 * torch.randn(18, 16), dim=1)
    args = Args()
    args.CMFP, args.k_cmff = use_cmfp, 4
    out = part_ot(args, 0, fv, fr, ids_v, ids_r, torch.zeros(5, 1), torch.zeros(3, 1))
    capsys.readouterr()
    ours = dagl_associate(fv, fr, ids_v, ids_r, cmfp_k=4 if use_cmfp else None)
    for key, index in (("intra_v", 0), ("intra_r", 1), ("cross_v", 2), ("cross_r", 3)):
        assert torch.equal(ours[key], out[index]), key
    assert int(ours["cross_v"].max()) < 3 and int(ours["cross_r"].max()) < 5
    # labels = argmax(-lam D + log beta): literal from the plan's column scaling
    cost = ((fv[:, None] - ours["centres_r"][None]) ** 2).sum(-1)
    plan, _ = sinkhorn_reference_stop(cost, 5.0) if not use_cmfp else (None, None)
    if plan is not None:
        beta = plan[0] / torch.exp(-5 * cost[0])  # alpha_0 beta: a constant factor leaves the argmax
        assert torch.equal((-5 * cost + torch.log(beta)).argmax(1), ours["cross_v"])


def test_refinement_uses_dot_product_with_unnormalised_centres():
    # cluster 0 is loose (its mean is short), cluster 1 tight: x is nearer cluster 0 in angle but the dot product
    # with the longer centre of cluster 1 wins
    fv = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [0.9, 0.436]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    fr = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=1)
    out = dagl_associate(fv, fr, labels, torch.tensor([0, 1]), cmfp_k=None)
    c0 = fv[:2].mean(0)
    x = F.normalize(torch.tensor([[0.75, 0.66]]), dim=1)
    assert float(F.cosine_similarity(x, c0[None])) > 0.99
    assert out["intra_v"].tolist() == (fv @ out["centres_v"].t()).argmax(1).tolist()
    assert out["intra_v"][0].item() == 1  # DBSCAN said 0: changed by refinement even with CMFP off
    kept = dagl_associate(fv, fr, labels, torch.tensor([0, 1]), cmfp_k=None, refine=False)
    assert torch.equal(kept["intra_v"], labels)


def test_associate_keeps_outliers_and_builds_memories_from_raw_labels():
    method = make_method("method.k_train=2", "method.num_parts=2", d=4)
    torch.manual_seed(3)
    d, np_ = 4, 2
    feats = {}
    for m, n in (("visible", 7), ("infrared", 5)):
        g = F.normalize(torch.randn(n, d), dim=1)
        pg = F.normalize(torch.randn(n, (np_ + 1) * d), dim=1)
        feats[m] = {"feature": g, "pg": pg}
    from vireid_fast.modality import INFRARED, VISIBLE

    raw = {VISIBLE: torch.tensor([0, 0, 1, -1, 1, 2, 2]), INFRARED: torch.tensor([1, 0, -1, 0, 1])}
    method.raw_labels = raw
    labels = method.associate({VISIBLE: feats["visible"], INFRARED: feats["infrared"]}, raw)
    assert labels[VISIBLE][3] == -1 and method.cross_visible[3] == -1 and method.cross_infrared[2] == -1
    assert bool((method.cross_visible[raw[VISIBLE] >= 0] >= 0).all())
    method.build_memories({VISIBLE: feats["visible"], INFRARED: feats["infrared"]}, labels)
    pg = feats["visible"]["pg"]
    mean1 = pg[[2, 4]].mean(0)  # raw cluster 1, whole-vector-normalised rows averaged, then sliced
    for p in range(2):
        torch.testing.assert_close(method.part_vv[p, 1], F.normalize(mean1[p * d:(p + 1) * d], dim=0))
    per_part = F.normalize(pg[[2, 4]][:, d:2 * d], dim=1).mean(0)
    assert not torch.allclose(method.part_vv[1, 1], F.normalize(per_part, dim=0))
    torch.testing.assert_close(method.memory_visible[1], F.normalize(feats["visible"]["feature"][[2, 4]].mean(0),
                                                                     dim=0))
    assert method.instance_v.shape == (6, d) and method.instance_vp.shape == (2, 6, d)
    assert method.row_visible[4].item() == 3  # dataset index 4 is the fourth non-outlier


def test_pair_sampler_pairs_by_label_space():
    method = make_method("method.pair_identities=4", "method.pair_instances=3", "train.iters=5", d=3)
    method.intra_visible = torch.tensor([0, 0, 1, 1, 2, 2, -1, 0])
    method.cross_visible = torch.tensor([1, 1, 0, 0, 1, 0, -1, 1])
    method.intra_infrared = torch.tensor([0, 0, 1, 1, 1, -1])
    method.cross_infrared = torch.tensor([2, 1, 0, 0, 1, -1])
    method.instance_v = torch.zeros(7, 3)
    batches = method.batch_sampler({}, 0)
    from vireid_fast.modality import INFRARED, VISIBLE

    assert len(batches[VISIBLE]) == len(batches[INFRARED]) == 5
    for vis, ir in zip(batches[VISIBLE], batches[INFRARED], strict=True):
        assert len(vis) == len(ir) == 12  # P K pairs
        for j in range(6):  # visible-space labels: intra of v = cross of r
            assert method.intra_visible[vis[j]] == method.cross_infrared[ir[j]]
        for j in range(6, 12):  # infrared-space labels: cross of v = intra of r
            assert method.cross_visible[vis[j]] == method.intra_infrared[ir[j]]
        assert len({int(method.intra_visible[i]) for i in vis[:6]}) == 2
        assert len({int(method.intra_infrared[i]) for i in ir[6:]}) == 2
        assert 6 not in vis and 5 not in ir


def test_stage1_only_never_switches_and_stage1_is_dcl():
    from vireid_fast.config import load_config

    config = load_config(None, ["method.name=salcr", "method.stage1_only=true", "method.stage1_epochs=1"])
    method = SALCR(config.method, make_context(FakeEncoder(3), config=config))
    for epoch in range(4):
        method.start_epoch(epoch)
        assert method.stage == 1
    out = method.embed(method.ctx.model.eval(), torch.rand(2, 3, 6, 3), 0)
    assert set(out) == {"feature"}  # no part head in stage 1


def test_converged_stop_gives_the_reference_labels_on_balanced_clusters():
    torch.manual_seed(5)
    centres = F.normalize(torch.randn(6, 32), dim=1)
    ids = torch.arange(60) % 6
    fv = F.normalize(centres[ids] + 0.1 * torch.randn(60, 32), dim=1)
    fr = F.normalize(centres[ids[:36]] + 0.1 * torch.randn(36, 32), dim=1)
    ref = dagl_associate(fv, fr, ids, ids[:36], cmfp_k=None, stop="reference")
    conv = dagl_associate(fv, fr, ids, ids[:36], cmfp_k=None, stop="converged")
    assert torch.equal(ref["cross_v"], conv["cross_v"]) and torch.equal(ref["cross_r"], conv["cross_r"])
    assert torch.equal(ref["cross_v"], ids) and torch.equal(ref["cross_r"], ids[:36])


def test_cluster_emptied_by_refinement_keeps_its_rows_and_is_never_sampled():
    from vireid_fast.modality import INFRARED, VISIBLE

    method = make_method("method.k_train=2", "method.num_parts=1", "method.pair_identities=2",
                         "method.pair_instances=1", "method.cmfp_train=false", "train.iters=20", d=2)
    # visible cluster 1 = one far-off point and one near cluster 0's members: its short centre loses both
    g_v = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.95, 0.3], [0.0, 1.0], [1.0, 0.02]]), dim=1)
    raw_v = torch.tensor([0, 0, 1, 1, 0])
    g_r = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), dim=1)
    raw_r = torch.tensor([0, 1, 0])
    feats = {VISIBLE: {"feature": g_v, "pg": torch.cat([g_v, g_v], 1)},
             INFRARED: {"feature": g_r, "pg": torch.cat([g_r, g_r], 1)}}
    method.raw_labels = {VISIBLE: raw_v, INFRARED: raw_r}
    labels = method.associate(feats, method.raw_labels)
    method.build_memories(feats, labels)
    assert method.memory_visible.shape[0] == 2 and method.part_vv.shape[1] == 2
    emptied = set(range(2)) - set(labels[VISIBLE].tolist())
    batches = method.batch_sampler(labels, 0)
    if batches is None:  # no visible-space label left with both modalities: the epoch is skipped, never a crash
        return
    for vis in batches[VISIBLE]:
        assert not emptied & {int(labels[VISIBLE][i]) for i in vis[:1]}


@pytest.mark.parametrize("on", [True, False])
def test_cmfp_train_switch_runs_cmfp_on_non_outlier_globals_only(monkeypatch, on):
    import vireid_fast.methods.salcr as module
    from vireid_fast.modality import INFRARED, VISIBLE

    seen = []
    real = module.cmfp

    def spy(fv, fr, k):
        seen.append((fv.shape[0], fr.shape[0], k))
        return real(fv, fr, k)

    monkeypatch.setattr(module, "cmfp", spy)
    method = make_method(f"method.cmfp_train={str(on).lower()}", "method.k_train=30", d=4)
    torch.manual_seed(0)
    feats = {VISIBLE: {"feature": F.normalize(torch.randn(7, 4), dim=1)},
             INFRARED: {"feature": F.normalize(torch.randn(5, 4), dim=1)}}
    raw = {VISIBLE: torch.tensor([0, 0, 1, -1, 1, 2, 2]), INFRARED: torch.tensor([1, 0, -1, 0, 1])}
    method.associate(feats, raw)
    assert seen == ([(6, 4, 4)] if on else [])  # outliers dropped; k clipped to min(N_v, N_r)


def test_odd_pair_identities_is_refused():
    with pytest.raises(ValueError, match="pair_identities must be even.*got 5"):
        make_method("method.pair_identities=5", d=3)


def test_paper_preset_keys():
    paper = make_method(name="salcr_paper", d=3)
    p = paper.params
    assert (p.loss_norm, p.ra_slot, p.gpcr_global_views, p.refine_intra_labels, p.ot_center_norm,
            p.pair_instances) == ("paper", "fixed", 2, False, True, 4)


# ------------------------------------------------------------------------------------------------- engine
from tests.engine.tiny import assert_same_state, resume_after_kill, tiny_config, tiny_root  # noqa: E402

ENGINE = ("method.stage1_epochs=1", "method.pair_identities=2", "method.pair_instances=2", "method.k_train=4",
          "method.k_instance=3", "method.num_parts=2", "eval.eval_untrained=false")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_root(tmp_path_factory)


@pytest.mark.parametrize("name", ["salcr", "salcr_paper"])
def test_trains_in_the_engine_and_resumes_bit_exact(tiny, tmp_path, monkeypatch, name):
    import json

    from vireid_fast.engine.trainer import Trainer

    def quiet(*args, **kwargs):
        pass

    overrides = (f"method.name={name}", *ENGINE, "train.epochs=3")
    full = Trainer(tiny_config(str(tmp_path / "full"), *overrides), data_root=tiny, log=quiet, progress=False)
    full.fit()
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["stage"] for r in rows if "stage" in r] == [1.0, 2.0, 2.0]
    assert {"loss/global", "loss/fgsal", "loss/gpcr_global", "loss/gpcr_part"} <= set(rows[-1])
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    assert "part_head.prototypes" in full.method.state_dict()
    # the engine reports the pair precision/recall of both label spaces in stage 2 (the shared_label_spaces hook)
    assert "xmod/visible_space/precision" not in rows[0] and 0 <= rows[-1]["xmod/infrared_space/recall"] <= 1
    from vireid_fast.engine.metrics import cross_modality_pair_precision_recall

    truth = full.ground_truth()
    expect = cross_modality_pair_precision_recall(truth["visible"], full.method.intra_visible.numpy(),
                                                  truth["infrared"], full.method.cross_infrared.numpy())
    assert rows[-1]["xmod/visible_space/precision"] == pytest.approx(expect[0], nan_ok=True)
    resumed = resume_after_kill(tiny, str(tmp_path / "killed"), overrides, 2, monkeypatch, quiet)
    resumed.fit()
    assert_same_state((full.encoder, resumed.encoder), (full.method, resumed.method))
