"""PCLHD: ClusterMemory modes (CM, CMhybrid, CMhard with model_name), label smoothing, modal-invariant Jaccard."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.compat import literal
from tests.compat.test_jaccard_l2 import unnormalised
from vireid_fast.compat.pclhd import ClusterMemory, compute_jaccard_distance, compute_modal_invariant_jaccard_distance


def smoothed_ce(logits, targets, num_classes):
    """PCLHD's CrossEntropyLabelSmooth(num_classes, 0.1, topk_smoothing=True)."""
    log_probs = F.log_softmax(logits, dim=1)
    k = num_classes // 50
    if k > 1:
        top = torch.argsort(-log_probs)[:, :k]
        target = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 0.9)
        target += torch.zeros_like(log_probs).scatter_(1, top, 0.1 / k)
    else:
        target = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
        target = 0.9 * target + 0.1 / num_classes
    return (-target * log_probs).mean(0).sum()


def hybrid_loss(x, t, memory, ce):
    mean, hard = torch.chunk(literal.cm(x, t, memory, 0.1, "hybrid") / 0.05, 2, dim=1)
    return 0.5 * (ce(hard, t) + torch.relu(ce(mean, t) - 0.2))


@pytest.mark.parametrize("smooth,classes", [(0, 6), (0.1, 6), (0.1, 120)])
def test_cm_mode(smooth, classes):
    x, t, centres = literal.batch(1, c=classes, b=max(24, classes))
    memory = ClusterMemory(16, classes, temp=0.05, momentum=0.1, mode="CM", smooth=smooth, num_instances=4)
    memory.features = centres.clone()
    lit = centres.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = memory(a, t)
    logits = literal.cm(b, t, lit, 0.1, "seq") / 0.05
    expected = smoothed_ce(logits, t, classes) if smooth else F.cross_entropy(logits, t)
    out.backward()
    expected.backward()
    literal.assert_step(out, expected, a, b, memory.features, lit)


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("mode", ["CMhybrid", "CMhard"])
def test_hybrid_encoder_branch(mode, near):
    x, t, centres = literal.batch(2, c=6)
    if near:  # inputs close to their prototypes: CE(mean) < the 0.2 margin, where the relu matters
        x = 3 * centres[t] + 0.05 * x
    memory = ClusterMemory(16, 6, temp=0.05, momentum=0.1, mode=mode, num_instances=4)
    assert memory.features.shape == (12, 16)
    memory.features = F.normalize(centres.repeat(2, 1), dim=1)  # as the scripts assign it
    lit = memory.features.clone()
    for step in range(2):  # after the first update the mean and hard halves differ
        a, b = (x + 0.1 * step).clone().requires_grad_(), (x + 0.1 * step).clone().requires_grad_()
        out = memory(a, t) if mode == "CMhybrid" else memory(a, t, model_name="encoder")
        expected = hybrid_loss(b, t, lit, F.cross_entropy)
        out.backward()
        expected.backward()
        literal.assert_step(out, expected, a, b, memory.features, lit)


@pytest.mark.parametrize("classes", [6, 1])  # 1: all 24 samples share a label, >= 16 members draw without replacement
def test_cmhard_encoder_ema_branch_draws_like_the_community(classes):
    n_inst = 4
    x, t, _ = literal.batch(3, c=classes)
    _, _, ema = literal.batch(4, c=classes, rows=classes * n_inst)
    memory = ClusterMemory(16, classes, temp=0.05, momentum=0.1, mode="CMhard", num_instances=n_inst)
    assert memory.features_ema.shape == (classes * n_inst, 16) and memory.hard_weight == 0.5
    memory.features_ema = ema.clone()
    lit = ema.clone()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    np.random.seed(7)
    out = memory(a, t, model_name="encoder_ema")
    out.backward()
    logits = literal.cm(b, t, lit, 0.1, "instance", n_inst) / 0.05
    per = torch.stack(torch.chunk(logits, n_inst, dim=1), dim=0)
    mask = torch.zeros_like(per[0]).scatter_(1, t.unsqueeze(1), 1)
    expected = F.cross_entropy(mask * per.min(0)[0] + (1 - mask) * per.max(0)[0], t)
    np.random.seed(7)
    expected.backward()
    literal.assert_step(out, expected, a, b, memory.features_ema, lit)


def test_constructor_and_branch_errors_pickle_state_dict():
    with pytest.raises(TypeError, match="Cluster Memory CMx is invalid"):
        ClusterMemory(16, 6, mode="CMx")
    memory = ClusterMemory(16, 6, mode="CMhard", num_instances=4)
    with pytest.raises(ValueError, match="model_name must be 'encoder' or 'encoder_ema'.*got 'ema'"):
        memory(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), model_name="ema")
    assert set(memory.state_dict()) == {"features", "features_ema"}
    clone = pickle.loads(pickle.dumps(memory))
    assert clone.cm_type == "CMhard" and clone.num_instances == 4


def files(modality):
    return [(f"/data/SYSU/{'ir_modify' if m else 'rgb_modify'}/{i:04d}.jpg", i % 7, 1 + m) for i, m in
            enumerate(modality)]


@pytest.mark.parametrize("n,k1,k2", [(72, 20, 8), (90, 40, 32)])
def test_modal_invariant_jaccard(n, k1, k2):
    x = unnormalised(n, 12, n)
    modality = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    got = compute_modal_invariant_jaccard_distance(torch.from_numpy(x), k1=k1, k2=k2, file=files(modality),
                                                   search_option=3, print_flag=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, literal.jaccard(x, k1, k2, modality=modality), rtol=0, atol=1e-5)
    plain = compute_jaccard_distance(torch.from_numpy(x), k1=k1, k2=k2, print_flag=False)
    assert np.abs(plain - got).max() > 1e-3, "the modality-invariant expansion must change the result"


def test_modal_invariant_jaccard_errors():
    x = torch.from_numpy(unnormalised(40, 8, 9))
    names = files(np.zeros(40, int))
    with pytest.raises(ValueError, match="got 39 entries for N=40 rows"):
        compute_modal_invariant_jaccard_distance(x, names[:39], k1=10, print_flag=False)
    names[5] = ("/data/other/0005.jpg", 0, 1)
    with pytest.raises(ValueError, match=r"file\[5\] = '/data/other/0005.jpg' contains neither"):
        compute_modal_invariant_jaccard_distance(x, names, k1=10, print_flag=False)
