"""The supervised ceiling: joint true-identity labels, DCL's terms plus read-only cross-modality terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vireid_fast.config import load_config
from vireid_fast.methods import Supervised, TrainBatch
from vireid_fast.modality import INFRARED, VISIBLE
from vireid_fast.models import small_resnet

from .context import make_context


def literal_memory_ce(feats, targets, memory, temp):
    logits = F.normalize(feats, dim=1) @ memory.T / temp
    return F.cross_entropy(logits, targets)


def test_labels_are_true_identities_numbered_jointly():
    truth = {VISIBLE: np.array([17, 3, 17, 40]), INFRARED: np.array([40, 3, 99])}
    model = small_resnet(widths=(8, 8, 8, 16))
    method = Supervised(load_config(None, ["method.name=supervised"]).method, make_context(model, truth=truth))
    assert method.classifier.weight.shape == (4, 16)  # one class per identity of either modality
    labels = method.pseudo_label({})
    assert labels[VISIBLE].tolist() == [1, 0, 1, 2] and labels[INFRARED].tolist() == [2, 0, 3]
    assert labels[VISIBLE].dtype == torch.int64


def test_terms_equal_their_equations_and_cross_terms_do_not_update():
    torch.manual_seed(0)
    model = small_resnet(widths=(8, 8, 8, 16))
    params = load_config(None, ["method.name=supervised", "method.momentum=0.5", "method.cross_weight=0.6",
                                "method.id_weight=0.7"]).method
    truth = {VISIBLE: np.array([5, 6, 7, 8]), INFRARED: np.array([5, 6, 7, 8])}
    method = Supervised(params, make_context(model, truth=truth))
    feats = {m: {"feature": F.normalize(torch.randn(n, 16), dim=1)} for m, n in ((VISIBLE, 9), (INFRARED, 7))}
    labels = {VISIBLE: torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0]), INFRARED: torch.tensor([0, 1, 1, 2, 2, 3, 3])}
    method.build_memories(feats, labels)
    mv, mi = method.memory_visible.clone(), method.memory_infrared.clone()
    f_vis, f_aug, f_ir = (torch.randn(4, 16, requires_grad=True) for _ in range(3))
    y_vis, y_ir = torch.tensor([0, 0, 3, 3]), torch.tensor([3, 3, 1, 1])
    losses = method.memory_losses(f_vis, f_aug, f_ir, y_vis, y_ir)
    temp = params.temp
    torch.testing.assert_close(losses["visible"], literal_memory_ce(f_vis, y_vis, mv, temp))
    torch.testing.assert_close(losses["augmented"], literal_memory_ce(f_aug, y_vis, mv, temp))
    torch.testing.assert_close(losses["infrared"], literal_memory_ce(f_ir, y_ir, mi, temp))
    want_cross = 0.6 / 3 * (literal_memory_ce(f_vis, y_vis, mi, temp) + literal_memory_ce(f_aug, y_vis, mi, temp)
                            + literal_memory_ce(f_ir, y_ir, mv, temp))
    torch.testing.assert_close(losses["cross"], want_cross)
    weight = method.classifier.weight
    want_id = 0.7 / 3 * (F.cross_entropy(f_vis @ weight.T, y_vis) + F.cross_entropy(f_aug @ weight.T, y_vis)
                         + F.cross_entropy(f_ir @ weight.T, y_ir))
    torch.testing.assert_close(losses["identity"], want_id)
    got = torch.autograd.grad(losses["identity"], [f_aug, weight], retain_graph=True)
    for g, ref in zip(got, torch.autograd.grad(want_id, [f_aug, weight], retain_graph=True), strict=True):
        torch.testing.assert_close(g, ref)
    # gradients of the cross term alone equal the literal ones
    grads = torch.autograd.grad(losses["cross"], [f_vis, f_ir], retain_graph=True)
    want = torch.autograd.grad(want_cross, [f_vis, f_ir])
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)
    # with only the cross term backpropagated, no memory moves (the updates belong to the own-modality terms)
    assert torch.equal(method.memory_visible, mv) and torch.equal(method.memory_infrared, mi)
    sum(v for k, v in losses.items() if k not in ("cross", "identity")).backward()
    assert not torch.equal(method.memory_visible, mv)


@pytest.mark.parametrize(("switches", "terms"), [
    (["method.cross_weight=0", "method.id_weight=0"], {"visible", "augmented", "infrared"}),
    (["method.cross_weight=0"], {"visible", "augmented", "infrared", "identity"}),
    (["method.id_weight=0"], {"visible", "augmented", "infrared", "cross"}),
])
def test_weight_switches_remove_exactly_their_terms(switches, terms):
    params = load_config(None, ["method.name=supervised", *switches]).method
    torch.manual_seed(1)
    model = small_resnet(widths=(8, 8, 8, 16))
    truth = {VISIBLE: np.arange(6), INFRARED: np.arange(6)}
    method = Supervised(params, make_context(model, truth=truth))
    feats = {m: {"feature": F.normalize(torch.randn(6, 16), dim=1)} for m in (VISIBLE, INFRARED)}
    labels = {m: torch.tensor([0, 0, 1, 1, 2, 2]) for m in (VISIBLE, INFRARED)}
    method.build_memories(feats, labels)
    images = torch.randint(0, 255, (4, 3, 32, 16), dtype=torch.uint8)
    batch = TrainBatch(images, torch.tensor([0, 0, 2, 2]), torch.arange(4), images.flip(0),
                       torch.tensor([1, 1, 0, 0]), torch.arange(4))
    assert set(method.training_step(batch)) == terms
