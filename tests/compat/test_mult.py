"""MULT: logits memory (targets=None, momentum_fix), MULT label transfer, one-hot labels, rerank_jaccard."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.compat import literal
from tests.compat.test_jaccard_l2 import unnormalised
from vireid_fast.compat.mult import (
    MULT,
    ClusterMemory,
    compute_jaccard_distance,
    generate_one_hot_label,
    rerank_jaccard,
    sinkhorn_solver,
)


@pytest.mark.parametrize("with_targets,momentum_fix", [(True, True), (True, False), (False, True)])
def test_memory_returns_logits(with_targets, momentum_fix):
    x, t, centres = literal.batch(1)
    memory = ClusterMemory(16, 6, temp=0.05, momentum=0.1)
    memory.features = centres.clone()  # main.py: m_v.features = centers_RGB.to(device)
    lit = centres.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    soft = torch.softmax(torch.randn(24, 6), dim=1)
    out = memory(a, t if with_targets else None, momentum_fix=momentum_fix)
    assert out.shape == (24, 6)
    mode = "seq" if with_targets and momentum_fix else "none"
    expected = literal.cm(b, t, lit, 0.1, mode) / 0.05
    # The trainer's losses on the logits: cross-entropy and a soft-label term.
    (F.cross_entropy(out, t) - (soft * F.log_softmax(out, 1)).sum(1).mean()).backward()
    (F.cross_entropy(expected, t) - (soft * F.log_softmax(expected, 1)).sum(1).mean()).backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)
    if mode == "none":
        assert torch.equal(memory.features, centres)
    assert set(memory.state_dict()) == {"features"} and memory.threshold == 0.5
    assert pickle.loads(pickle.dumps(memory)).features.shape == (6, 16)


def literal_lp(a1, a2, a3, a4, ya, yb, alpha):
    ya_new, yb_new, ya_old, yb_old = ya.clone(), yb.clone(), ya.clone(), yb.clone()
    eps, it = 1e6, 0
    while eps > 1e-2 and it < 20:
        ya_new = (1 - alpha) * a4.mm(yb_new) + alpha * ya
        yb_new = (1 - alpha) * a3.mm(ya_new) + alpha * yb
        ya_new = 0.5 * a2.mm(ya_new) + 0.5 * ya_new
        yb_new = 0.5 * a1.mm(yb_new) + 0.5 * yb_new
        eps = max(float((yb_new - yb_old).abs().sum() / yb_old.sum()), float((ya_new - ya_old).abs().sum()
                                                                             / ya_old.sum()))
        ya_old, yb_old = ya_new.clone(), yb_new.clone()
        it += 1
    return yb_new, ya_new


def literal_mult(alpha, f_rgb, f_ir, c_rgb, c_ir, d_rgb, d_ir, temp=0.05):
    y_rgb = torch.softmax(f_rgb.mm(c_rgb.t()) / temp, dim=1)
    y_ir = torch.softmax(f_ir.mm(c_ir.t()) / temp, dim=1)
    y_rgb_cm = literal.one_hot(literal.sinkhorn(literal.sqdist(f_rgb, c_ir), 25).argmax(1), len(c_ir))
    y_ir_cm = literal.one_hot(literal.sinkhorn(literal.sqdist(f_ir, c_rgb), 25).argmax(1), len(c_rgb))
    p = literal.sinkhorn(literal.sqdist(f_rgb, f_ir), 25)
    a_rgb, a_ir = 1 - torch.from_numpy(d_rgb), 1 - torch.from_numpy(d_ir)
    a_rgb, a_ir = a_rgb / a_rgb.sum(1)[:, None], a_ir / a_ir.sum(1)[:, None]
    a_ri, a_ir_r = p / p.sum(1)[:, None], p.t() / p.t().sum(1)[:, None]
    y_rgb_cm_new, y_ir_new = literal_lp(a_rgb, a_ir, a_ri, a_ir_r, y_ir, y_rgb_cm, alpha)
    y_ir_cm_new, y_rgb_new = literal_lp(a_ir, a_rgb, a_ir_r, a_ri, y_rgb, y_ir_cm, alpha)
    return y_rgb_new, y_ir_new, y_rgb_cm_new, y_ir_cm_new


def test_mult_label_transfer():
    g = torch.Generator().manual_seed(0)
    f_rgb = F.normalize(torch.randn(48, 16, generator=g), dim=1)
    f_ir = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    l_rgb, l_ir = torch.arange(48) % 5, torch.arange(40) % 4
    c_rgb = torch.stack([f_rgb[l_rgb == i].mean(0) for i in range(5)])
    c_ir = torch.stack([f_ir[l_ir == i].mean(0) for i in range(4)])
    d_rgb = compute_jaccard_distance(f_rgb, k1=12, k2=4, print_flag=False)
    d_ir = compute_jaccard_distance(f_ir, k1=12, k2=4, print_flag=False)
    args = SimpleNamespace(alpha=0.9)
    out = MULT(args, 3, f_rgb, f_ir, l_rgb, l_ir, c_rgb, c_ir, d_rgb, d_ir)
    assert len(out) == 10 and out[4] is c_rgb and out[5] is c_ir
    y_rgb, y_ir, y_rgb_cm, y_ir_cm = literal_mult(0.9, f_rgb, f_ir, c_rgb, c_ir, d_rgb, d_ir)
    for got, want in zip(out[6:], (y_rgb, y_ir, y_rgb_cm, y_ir_cm), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(out[:4], (y_rgb, y_ir, y_rgb_cm, y_ir_cm), strict=True):
        assert torch.equal(got, want.argmax(1))


def test_sinkhorn_solver_and_one_hot(capsys):
    g = torch.Generator().manual_seed(1)
    for n, k, d, lam in [(30, 5, 8, 5), (30, 5, 8, 25), (60, 8, 4, 25), (100, 10, 2, 25), (40, 6, 3, 5)]:
        cost = literal.sqdist(F.normalize(torch.randn(n, d, generator=g), dim=1),
                              F.normalize(torch.randn(k, d, generator=g), dim=1))
        plan, steps = literal.sinkhorn(cost, lam, return_steps=True)
        torch.testing.assert_close(sinkhorn_solver(cost, lambda_sk=lam), plan, atol=1e-6, rtol=1e-5)
        assert f"Total step: {steps} " in capsys.readouterr().out  # the same stopping step
    labels = torch.tensor([2, 0, 1, 2])
    assert torch.equal(generate_one_hot_label(labels, 4), literal.one_hot(labels, 4))
    assert generate_one_hot_label(np.array([1, 0]), 2).dtype == torch.float32


def test_rerank_jaccard_block():
    x = unnormalised(70, 12, 2)
    rgb, ir = torch.from_numpy(x[:30]), torch.from_numpy(x[30:])
    got = rerank_jaccard(rgb, ir, k1=20, k2=6)
    full = literal.jaccard(np.concatenate([x[30:], x[:30]]), 20, 6)
    assert got.shape == (40, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, full[:40, 40:], rtol=0, atol=1e-5)
    swapped = rerank_jaccard(ir, rgb, k1=20, k2=6)  # more columns than rows
    np.testing.assert_allclose(swapped, literal.jaccard(x, 20, 6)[:30, 30:], rtol=0, atol=1e-5)
