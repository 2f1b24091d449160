"""Every compat memory across epochs: buffer reassignment with a new cluster count, checkpoint (state_dict) and pickle
in mid-training, then training continues identically."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from tests.compat import literal
from vireid_fast.compat import adca, clustercontrast, hil, mult, pclhd, pgm, salcr


def _scalar(out, targets):
    return out if out.dim() == 0 else F.cross_entropy(out, targets)  # logits memories: the trainer's loss


MEMORIES = {
    "clustercontrast": (lambda c: clustercontrast.ClusterMemory(16, c, momentum=0.1), 1),
    "adca": (lambda c: adca.ClusterMemory(16, c, momentum=0.1, use_hard=True), 1),
    "pgm": (lambda c: pgm.ClusterMemory(16, c, momentum=0.1), 1),
    "pclhd_cm": (lambda c: pclhd.ClusterMemory(16, c, momentum=0.1, mode="CM"), 1),
    "pclhd_hybrid": (lambda c: pclhd.ClusterMemory(16, c, momentum=0.1, mode="CMhybrid"), 2),
    "hil": (lambda c: hil.ClusterMemory(16, c, momentum=0.1), 1),
    "hil_shared": (lambda c: hil.ClusterMemory_shared(16, c, momentum=0.1), 1),
    "mult": (lambda c: mult.ClusterMemory(16, c, momentum=0.1), 1),
    "salcr": (lambda c: salcr.ClusterMemory(16, c, momentum=0.1), 1),
    "salcr_weighted": (lambda c: salcr.WeightedMemory(16, c, momentum=0.1), 1),
}


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_epochs_checkpoint_and_pickle(name):
    make, repeat = MEMORIES[name]
    for epoch, classes in enumerate((5, 8)):
        x, t, centres = literal.batch(epoch, c=classes)
        memory = make(classes)
        memory.features = F.normalize(centres.repeat(repeat, 1), dim=1)  # what the scripts assign every epoch
        assert memory.features.shape == (repeat * classes, 16)
        before = memory.features.clone()
        _scalar(memory(x.clone().requires_grad_(), t), t).backward()
        assert not torch.equal(memory.features, before), f"{name} epoch {epoch}: no update"
        restored = make(classes)
        restored.load_state_dict(copy.deepcopy(memory.state_dict()))
        unpickled = pickle.loads(pickle.dumps(memory))
        x2, t2, _ = literal.batch(10 + epoch, c=classes)
        for m in (memory, restored, unpickled):
            _scalar(m(x2.clone().requires_grad_(), t2), t2).backward()
        torch.testing.assert_close(restored.features, memory.features, atol=0, rtol=0)
        torch.testing.assert_close(unpickled.features, memory.features, atol=0, rtol=0)
