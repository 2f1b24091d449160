"""ADCA: two memories (one per modality) used as adca_*_train.py and ClusterContrastTrainer_ADCA_joint do."""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F

from tests.compat import literal
from vireid_fast.compat.adca import ClusterMemory, compute_jaccard_distance


def test_two_memories_over_epochs_match_the_community():
    for epoch, (c_ir, c_rgb) in enumerate([(5, 7), (8, 4)]):  # clusters change every epoch
        x_ir, t_ir, centres_ir = literal.batch(10 * epoch, c=c_ir, d=32)
        x_rgb, t_rgb, centres_rgb = literal.batch(10 * epoch + 1, c=c_rgb, d=32)
        memory_ir = ClusterMemory(32, c_ir, temp=0.05, momentum=0.1, use_hard=False)
        memory_rgb = ClusterMemory(32, c_rgb, temp=0.05, momentum=0.1, use_hard=False)
        memory_ir.features = F.normalize(centres_ir, dim=1)
        memory_rgb.features = F.normalize(centres_rgb, dim=1)
        lit_ir, lit_rgb = centres_ir.clone(), centres_rgb.clone()
        a_ir, a_rgb = x_ir.clone().requires_grad_(), x_rgb.clone().requires_grad_()
        b_ir, b_rgb = x_ir.clone().requires_grad_(), x_rgb.clone().requires_grad_()
        loss = memory_ir(a_ir, t_ir) + memory_rgb(a_rgb, t_rgb)
        expected = (literal.cluster_loss(b_ir, t_ir, lit_ir, 0.05, 0.1)
                    + literal.cluster_loss(b_rgb, t_rgb, lit_rgb, 0.05, 0.1))
        loss.backward()
        expected.backward()
        literal.assert_step(loss, expected, a_ir, b_ir, memory_ir.features, lit_ir)
        literal.assert_step(loss, expected, a_rgb, b_rgb, memory_rgb.features, lit_rgb)


def test_state_dict_pickle_and_jaccard_import():
    memory = ClusterMemory(16, 6, momentum=0.1)
    _, _, centres = literal.batch(3)
    memory.features = centres
    clone = pickle.loads(pickle.dumps(memory))
    assert torch.equal(clone.features, memory.features)
    other = ClusterMemory(16, 6)
    other.load_state_dict(memory.state_dict())
    assert torch.equal(other.features, centres) and set(memory.state_dict()) == {"features"}
    x, t, _ = literal.batch(4)
    clone(x.requires_grad_(), t).backward()
    assert not torch.equal(clone.features, memory.features), "the unpickled memory must update its own buffer"
    assert compute_jaccard_distance.__module__.endswith("clustercontrast")
