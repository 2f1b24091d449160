"""HIL: ClusterMemory / ClusterMemory_shared (ca=, training_momentum=, features_d), Memory_wise_v3, ranked lists."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.compat import literal
from vireid_fast.compat.hil import (
    ClusterMemory,
    ClusterMemory_shared,
    Memory_wise_v3,
    compute_jaccard_distance,
    compute_ranked_list,
    compute_ranked_list_cm,
)


@pytest.mark.parametrize("cls", [ClusterMemory, ClusterMemory_shared])
@pytest.mark.parametrize("use_hard", [False, True])
@pytest.mark.parametrize("with_ca,training_momentum", [(False, None), (True, None), (True, 0.5), (False, 0.0)])
def test_cluster_memory(cls, use_hard, with_ca, training_momentum):
    x, t, centres = literal.batch(1, d=24)
    memory = cls(24, 6, temp=0.05, momentum=0.1, use_hard=use_hard)
    assert memory.features_d.shape == (6, 10, 24)
    memory.features = centres.clone()
    memory.features_d = F.normalize(torch.randn(6, 10, 24), dim=2)
    assert memory.features_d.view(-1, 24).shape == (60, 24)  # how the trainer reads it
    lit = centres.clone()
    ca = torch.rand(24) if with_ca else None
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, t, ca=ca, training_momentum=training_momentum)
    used = 0.1 if training_momentum is None else training_momentum  # `== None`: 0.0 is used as given
    expected = literal.cluster_loss(b, t, lit, 0.05, used, "hard" if use_hard else "seq", ca=ca)
    out.backward()
    expected.backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)
    assert set(memory.state_dict()) == {"features", "features_d"}


def wise_loss(x, idx, features, temp, momentum):
    """Memory_wise_v3.forward: em logits, softmax, clamp at 1e-8, -log of the own-instance entries, mean."""
    sim = literal.cm(x, idx, features, momentum, "seq")
    score = F.softmax(sim / temp, dim=1).clamp_min(1e-8)
    mask = torch.zeros_like(score)
    mask[torch.arange(len(idx)), idx] = 1
    return -score.masked_select(mask.bool()).log().mean()


def test_memory_wise_v3():
    n, d = 40, 16
    memory = Memory_wise_v3(d, n, 5, temp=0.05, momentum=0.2)
    assert set(memory.state_dict()) == {"features", "labels", "cam"}
    feats = F.normalize(torch.randn(n, d), dim=1)
    memory.features = feats.clone()
    memory.labels = torch.from_numpy(np.r_[np.arange(n - 4) % 5, [-1] * 4])
    memory.cam = torch.arange(n).int() % 2
    lit = feats.clone()
    x = torch.randn(12, d)
    idx = torch.randperm(n)[:12]
    idx[3] = idx[7]  # a repeated instance: updated twice, in batch order
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, idx, cameras=torch.zeros(12), neighbor_eps=0.8)
    expected = wise_loss(b, idx, lit, 0.05, 0.2)
    out.backward()
    expected.backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)
    assert memory.thresh == -1 and memory.neighbor_eps == 0.8
    memory.cam2uid_()
    assert memory.allcam == [0, 1] and memory.cam2uid[1] == list(range(1, n, 2))
    memory.cam_mem_gen()
    for c in (0, 1):
        rows = [i for i in range(n) if int(memory.cam[i]) == c and int(memory.labels[i]) != -1]
        labels = sorted({int(memory.labels[i]) for i in rows})
        centres = torch.stack([memory.features[[i for i in rows if int(memory.labels[i]) == lab]].mean(0)
                               for lab in labels])
        torch.testing.assert_close(memory.cam_mem[c], centres, atol=1e-6, rtol=0)
    before = memory.features.clone()
    y = F.normalize(torch.randn(3, d), dim=1)
    memory.updateEM(y, torch.tensor([0, 1, 0]))
    for row, (v, r) in enumerate(zip(y, [0, 1, 0], strict=True)):
        before[r] = 0.2 * before[r] + 0.8 * v
        before[r] /= before[r].norm()
        del row
    torch.testing.assert_close(memory.features, before, atol=1e-6, rtol=0)
    clone = pickle.loads(pickle.dumps(memory))
    assert torch.equal(clone.features, memory.features)


def test_ranked_lists():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    p = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    expected = np.argsort((1 - f @ f.t()).numpy(), axis=1, kind="stable")[:, 1:21]
    got = compute_ranked_list(f, k=20, search_option=3, verbose=False)
    assert isinstance(got, np.ndarray) and got.shape == (50, 20)
    np.testing.assert_array_equal(got, expected)
    expected_cm = np.argsort((1 - f @ p.t()).numpy(), axis=1, kind="stable")[:, 1:11]
    np.testing.assert_array_equal(compute_ranked_list_cm(f, p, k=10, verbose=False), expected_cm)
    assert compute_jaccard_distance(f, k1=30, k2=6, search_option=3, print_flag=False).shape == (50, 50)
