"""SWPCL soft-weight prototypes: selection, weights, schedule, loss and update against plain loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vireid_fast.memory import SoftWeightPrototypeMemory


def _bank(seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(30, 8, generator=gen)
    labels = torch.tensor([0] * 7 + [2] * 2 + [-1] * 3 + [5] * 9 + [2] * 4 + [0] * 5)
    return features, labels


def test_build_selects_nearest_members_of_each_centroid():
    features, labels = _bank()
    memory = SoftWeightPrototypeMemory(8, num_prototypes=4)
    memory.build(features, labels)
    normalized = F.normalize(features, dim=1)
    assert memory.prototypes.shape == (3, 4, 8)
    for row, label in enumerate([0, 2, 5]):
        members = [i for i in range(30) if labels[i] == label]
        centroid = F.normalize(normalized[members].mean(0), dim=0)
        sims = {i: float(normalized[i] @ centroid) for i in members}
        chosen = sorted(members, key=lambda i: -sims[i])[:4]
        assert memory.prototype_index[row].tolist() == chosen
        torch.testing.assert_close(memory.weights[row], torch.tensor([sims[i] for i in chosen]))
        torch.testing.assert_close(memory.prototypes[row], normalized[chosen])
        for slot, i in enumerate(chosen):
            assert int(memory.row_of_index[i]) == row * 4 + slot
    assert int((memory.row_of_index >= 0).sum()) == 12


def test_weights_follow_the_progressive_schedule():
    features, labels = _bank(1)
    memory = SoftWeightPrototypeMemory(8, num_prototypes=3, max_sharpness=5.0)
    memory.build(features, labels)
    early = memory.soft_weights()
    torch.testing.assert_close(early, memory.weights / memory.weights.sum(1, keepdim=True))
    memory.set_progress(1.0)
    late = memory.soft_weights()
    torch.testing.assert_close(late.sum(1), torch.ones(3))
    assert bool((late[:, 0] >= early[:, 0]).all()), "later weights concentrate on the most reliable prototype"
    with pytest.raises(ValueError):
        memory.set_progress(1.5)


def test_loss_gradient_and_update_match_a_loop():
    features, labels = _bank(2)
    memory = SoftWeightPrototypeMemory(8, num_prototypes=3, temp=0.1, momentum=0.5)
    memory.build(features, labels)
    memory.set_progress(0.5)
    before = memory.prototypes.clone()
    weights = memory.soft_weights().clone()
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(5, 8, generator=gen)
    targets = torch.tensor([0, 2, 1, 0, 2])
    indices = torch.tensor([int(memory.prototype_index[0, 1]), 4, int(memory.prototype_index[2, 0]), 10, 11])

    x = inputs.clone().requires_grad_(True)
    loss = memory(x, targets, indices)
    loss.backward()

    x2 = inputs.clone().requires_grad_(True)
    xn = F.normalize(x2, dim=1)
    valid = [(c, k) for c in range(3) for k in range(3) if memory.weights[c, k] > 0]
    terms = []
    for b in range(5):
        logits = {ck: xn[b] @ before[ck] / 0.1 for ck in valid}
        log_z = torch.logsumexp(torch.stack(list(logits.values())), 0)
        y = int(targets[b])
        terms.append(-sum(weights[y, k] * (logits[(y, k)] - log_z) for k in range(3) if (y, k) in logits))
    loss_ref = torch.stack(terms).mean()
    loss_ref.backward()
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)

    expected = before.clone()
    normalized = F.normalize(inputs, dim=1)
    for b, index in enumerate(indices.tolist()):
        row = int(memory.row_of_index[index])
        if row >= 0:
            c, k = divmod(row, 3)
            expected[c, k] = F.normalize(0.5 * expected[c, k] + 0.5 * normalized[b], dim=0)
    torch.testing.assert_close(memory.prototypes, expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(memory.prototypes, before)


def test_forward_before_build_raises():
    with pytest.raises(ValueError, match="build"):
        SoftWeightPrototypeMemory(4)(torch.randn(2, 4), torch.tensor([0, 0]))
