"""PGM (USL-VI-ReID): ClusterMemory with forward(..., momentum=), use_hard stage 2, cross-modality calls."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.compat import literal
from vireid_fast.compat.pgm import ClusterMemory


@pytest.mark.parametrize("use_hard", [False, True])
@pytest.mark.parametrize("momentum", [None, 0, 0.5])
def test_forward_momentum_override(use_hard, momentum):
    x, t, centres = literal.batch(1)
    memory = ClusterMemory(16, 6, temp=0.05, momentum=0.1, use_hard=use_hard)
    memory.features = centres.clone()
    lit = centres.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, t, momentum=momentum)
    used = 0.1 if not momentum else momentum  # the community tests `if not momentum`
    expected = literal.cluster_loss(b, t, lit, 0.05, used, "hard" if use_hard else "seq")
    out.backward()
    expected.backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)


def test_trainer_cross_loss_updates_one_memory_twice_in_autograd_order():
    """ClusterContrastTrainer: loss_ir + loss_rgb + memory_rgb(f_ir, ir2rgb) + memory_ir(f_rgb, rgb2ir)."""
    x_ir, t_ir, c_ir = literal.batch(5, c=6)
    x_rgb, t_rgb, c_rgb = literal.batch(6, c=6)
    ir2rgb, rgb2ir = (t_ir + 1) % 6, (t_rgb + 2) % 6
    m_ir, m_rgb = ClusterMemory(16, 6, momentum=0.1), ClusterMemory(16, 6, momentum=0.1)
    m_ir.features, m_rgb.features = c_ir.clone(), c_rgb.clone()
    l_ir, l_rgb = c_ir.clone(), c_rgb.clone()
    a_ir, a_rgb = x_ir.clone().requires_grad_(), x_rgb.clone().requires_grad_()
    b_ir, b_rgb = x_ir.clone().requires_grad_(), x_rgb.clone().requires_grad_()
    ours = m_ir(a_ir, t_ir) + m_rgb(a_rgb, t_rgb) + m_rgb(a_ir, ir2rgb.long()) + m_ir(a_rgb, rgb2ir.long())
    lit = (literal.cluster_loss(b_ir, t_ir, l_ir, 0.05, 0.1) + literal.cluster_loss(b_rgb, t_rgb, l_rgb, 0.05, 0.1)
           + literal.cluster_loss(b_ir, ir2rgb, l_rgb, 0.05, 0.1)
           + literal.cluster_loss(b_rgb, rgb2ir, l_ir, 0.05, 0.1))
    ours.backward()
    lit.backward()
    literal.assert_step(ours, lit, a_ir, b_ir, m_ir.features, l_ir)
    literal.assert_step(ours, lit, a_rgb, b_rgb, m_rgb.features, l_rgb)


def test_pickle_and_state_dict():
    memory = ClusterMemory(16, 6, momentum=0.1, use_hard=True)
    memory.features = literal.batch(2)[2]
    clone = pickle.loads(pickle.dumps(memory))
    assert clone.use_hard and torch.equal(clone.features, memory.features)
    assert set(memory.state_dict()) == {"features"}
