"""Memory variants against straightforward per-sample torch formulations (loss, input gradient, memory after)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vireid_fast.memory import (
    DynamicMemory,
    HybridMemory,
    InstanceMemory,
    MultiCentreMemory,
    mult_soft_labels,
    oclr_loss,
    positives_from_csr,
    sharpened_targets,
)

TEMP = 0.07


def _data(batch=14, dim=12, rows=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen) * 2, F.normalize(torch.randn(rows, dim, generator=gen), dim=1), gen


def _grad_of(loss_fn, inputs):
    x = inputs.clone().requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("loss_kind", ["official", "paper"])
def test_hybrid_memory(loss_kind):
    classes = 5
    inputs, memory, _ = _data(rows=2 * classes)
    targets = torch.tensor([3, 1, 1, 4, 3, 3, 1, 0, 4, 1, 3, 1, 0, 4])  # label 2 absent
    module = HybridMemory(12, classes, temp=TEMP, momentum=0.3, loss=loss_kind)
    module.features = memory.clone()
    loss, grad = _grad_of(lambda x: module(x, targets), inputs)

    def plain(x):
        logits = F.normalize(x, dim=1) @ memory.t() / TEMP
        ce_mean = F.cross_entropy(logits[:, :classes], targets)
        ce_hard = F.cross_entropy(logits[:, classes:], targets)
        return 0.5 * (ce_hard + F.relu(ce_mean - 0.2)) if loss_kind == "official" else ce_mean + ce_hard

    loss_ref, grad_ref = _grad_of(plain, inputs)
    expected = memory.clone()
    xn = F.normalize(inputs, dim=1)
    for y in sorted(set(targets.tolist())):
        members = [i for i in range(len(targets)) if targets[i] == y]
        prototype = memory[y]
        sims = [float(xn[i] @ prototype) for i in members]
        hard = members[sims.index(min(sims))]
        expected[y] = F.normalize(0.3 * memory[y] + 0.7 * xn[members].mean(0), dim=0)
        expected[y + classes] = F.normalize(0.3 * memory[y + classes] + 0.7 * xn[hard], dim=0)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.features, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(module.features[[2, 2 + classes]], memory[[2, 2 + classes]])


def test_dynamic_memory():
    classes, per_cluster = 4, 3
    inputs, memory, _ = _data(rows=classes * per_cluster, seed=1)
    targets = torch.tensor([0, 1, 1, 3, 0, 1, 1, 3, 3, 0, 1, 0, 1, 0])  # 2 absent; 3 has exactly 3 members
    module = DynamicMemory(12, classes, num_instances=per_cluster, temp=TEMP,
                           generator=torch.Generator().manual_seed(5))
    module.features = memory.clone()
    loss, grad = _grad_of(lambda x: module(x, targets), inputs)

    def plain(x):
        logits = F.normalize(x, dim=1) @ memory.t() / TEMP
        rows = []
        for b in range(x.shape[0]):
            row = []
            for c in range(classes):
                values = torch.stack([logits[b, c + classes * i] for i in range(per_cluster)])
                row.append(values.min() if c == targets[b] else values.max())
            rows.append(torch.stack(row))
        return F.cross_entropy(torch.stack(rows), targets)

    loss_ref, grad_ref = _grad_of(plain, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    xn = F.normalize(inputs, dim=1)
    for c in range(classes):
        rows = module.features[[c + classes * i for i in range(per_cluster)]]
        members = xn[targets == c]
        if len(members) == 0:
            assert torch.equal(rows, memory[[c + classes * i for i in range(per_cluster)]])
            continue
        matches = [int(torch.nonzero((members - r).abs().amax(1) < 1e-7).flatten()[0]) for r in rows]
        if len(members) >= per_cluster:
            assert len(set(matches)) == per_cluster, "without replacement when there are enough members"


def test_dynamic_memory_writes_update_features():
    module = DynamicMemory(6, 2, num_instances=2, generator=torch.Generator().manual_seed(0))
    module.features = F.normalize(torch.randn(4, 6), dim=1)
    inputs = torch.randn(3, 6, requires_grad=True)
    momentum_features = torch.randn(3, 6) * 5  # written as they are: no renormalisation
    module(inputs, torch.tensor([1, 1, 1]), update_features=momentum_features).backward()
    for row in module.features[[1, 3]]:
        assert any(torch.equal(row, m) for m in momentum_features)


def test_multi_centre_memory():
    classes, centres = 4, 3
    inputs, flat, _ = _data(rows=classes * centres, seed=2)
    memory = flat.view(classes, centres, -1)
    targets = torch.tensor([0, 2, 2, 3, 0, 2, 0, 3, 3, 2, 0, 2, 2, 0])
    module = MultiCentreMemory(12, classes, centres, temp=TEMP, momentum=0.4)
    module.features = memory.clone()
    x = inputs.clone().requires_grad_(True)
    identity, mccl = module(x, targets)
    (identity + 2 * mccl).backward()

    x2 = inputs.clone().requires_grad_(True)
    logits = F.normalize(x2, dim=1) @ flat.t() / TEMP
    id_terms, mccl_terms = [], []
    for b in range(len(targets)):
        per = [logits[b, c * centres:(c + 1) * centres] for c in range(classes)]
        cluster = torch.stack([p.max() for p in per])
        id_terms.append(torch.logsumexp(cluster, 0) - cluster[targets[b]])
        s = int(logits[b].argmax()) // centres
        pos = per[s]
        neg = torch.stack([cluster[c] for c in range(classes) if c != s])
        mccl_terms.append(torch.logsumexp(torch.cat([pos, neg]), 0) - torch.logsumexp(pos, 0))
    identity_ref, mccl_ref = torch.stack(id_terms).mean(), torch.stack(mccl_terms).mean()
    (identity_ref + 2 * mccl_ref).backward()
    torch.testing.assert_close(identity.detach(), identity_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mccl.detach(), mccl_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)

    expected = memory.clone()
    xn = F.normalize(inputs, dim=1)
    nearest = [int((memory[targets[b]] @ xn[b]).argmax()) for b in range(len(targets))]
    for b in range(len(targets)):
        y, j = int(targets[b]), nearest[b]
        expected[y, j] = expected[y, j] * 0.4 + 0.6 * xn[b]
        expected[y, j] /= expected[y, j].norm()
    torch.testing.assert_close(module.features, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(module.features[1], memory[1])


@pytest.mark.parametrize("layout", ["padded", "csr"])
def test_instance_memory(layout):
    size = 20
    inputs, memory, gen = _data(batch=6, rows=size, seed=3)
    indices = torch.tensor([4, 9, 4, 0, 17, 12])
    sets = [[4, 5], [9], [4, 1, 2, 3], [0, 19], [17, 16, 15], [12, 4]]
    module = InstanceMemory(12, size, temp=TEMP, momentum=0.9)
    module.features = memory.clone()
    if layout == "padded":
        width = max(map(len, sets))
        positives = torch.tensor([s + [-1] * (width - len(s)) for s in sets])
        loss, grad = _grad_of(lambda x: module(x, indices, positives), inputs)
    else:
        offsets = torch.tensor([0] + list(torch.tensor([len(s) for s in sets]).cumsum(0)))
        flat_sets = torch.tensor([i for s in sets for i in s])
        loss, grad = _grad_of(lambda x: module(x, indices, flat_sets, positive_offsets=offsets), inputs)

    def plain(x):
        logits = F.normalize(x, dim=1) @ memory.t() / TEMP
        terms = [-torch.log(torch.exp(logits[b, s]).sum() / torch.exp(logits[b]).sum()) for b, s in enumerate(sets)]
        return torch.stack(terms).mean()

    loss_ref, grad_ref = _grad_of(plain, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    expected = memory.clone()
    xn = F.normalize(inputs, dim=1)
    for b, i in enumerate(indices.tolist()):
        expected[i] = F.normalize(0.9 * expected[i] + 0.1 * xn[b], dim=0)
    torch.testing.assert_close(module.features, expected, atol=1e-6, rtol=1e-5)


def test_instance_memory_errors():
    module = InstanceMemory(4, 5)
    module.features = F.normalize(torch.randn(5, 4), dim=1)
    inputs = torch.randn(2, 4)
    with pytest.raises(ValueError, match="non-empty"):
        module(inputs, torch.tensor([0, 1]), torch.tensor([[0, 1], [-1, -1]]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        module(inputs, torch.tensor([0, 1]), torch.tensor([[0, 5], [1, -1]]))
    with pytest.raises(ValueError, match="indices must lie"):
        module(inputs, torch.tensor([0, 7]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="CSR"):
        module(inputs, torch.tensor([0, 1]), torch.tensor([0, 1]), positive_offsets=torch.tensor([0, 2]))


def test_positives_from_csr():
    padded = positives_from_csr(torch.tensor([0, 2, 2, 5]), torch.tensor([7, 1, 3, 4, 0]), 3)
    assert padded.tolist() == [[7, 1, -1], [-1, -1, -1], [3, 4, 0]]


def test_mult_soft_labels():
    scores = torch.softmax(torch.randn(5, 4), dim=1)
    soft = mult_soft_labels(scores, beta=0.7)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    expected = 0.3 * scores
    expected[torch.arange(5), scores.argmax(1)] += 0.7
    torch.testing.assert_close(soft, expected)


@pytest.mark.parametrize("detach", [False, True])
def test_oclr_loss(detach):
    inputs, memory, gen = _data(batch=8, rows=6, seed=4)
    target_memory = F.normalize(torch.randn(6, 12, generator=gen), dim=1)
    loss, grad = _grad_of(lambda x: oclr_loss(x, memory, target_memory, temp=TEMP, detach_target=detach), inputs)

    def plain(x):
        xn = F.normalize(x, dim=1)
        target = torch.softmax(xn @ target_memory.t() / (TEMP / 5), dim=1)
        if detach:
            target = target.detach()
        return -(target * torch.log_softmax(xn @ memory.t() / TEMP, dim=1)).sum(1).mean()

    loss_ref, grad_ref = _grad_of(plain, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    before = memory.clone()
    oclr_loss(inputs.requires_grad_(True), memory, target_memory).backward()
    assert torch.equal(memory, before), "OCLR must not update the memory"


def test_sharpened_targets_are_sharper():
    inputs, memory, _ = _data(batch=4, rows=5, seed=6)
    soft = sharpened_targets(inputs, memory, temp=0.5, sharpen=1.0)
    sharp = sharpened_targets(inputs, memory, temp=0.5, sharpen=5.0)
    assert bool((sharp.max(1).values >= soft.max(1).values).all())
