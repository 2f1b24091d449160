"""Engine pieces: the phase timer, the non-finite loss stop, the cross-modality pair metric, Modality, the
evaluation protocol as a dataset attribute."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from vireid_fast.engine import NonFiniteLossError, Trainer
from vireid_fast.engine.metrics import cross_modality_pair_precision_recall
from vireid_fast.engine.trainer import PhaseTimer
from vireid_fast.modality import INFRARED, VISIBLE, Modality

from .tiny import tiny_config, tiny_root


def literal_pair_precision_recall(tv, lv, tr, lr):
    same_label = same_both = same_id = 0
    for i, j in itertools.product(range(len(tv)), range(len(tr))):
        label = lv[i] >= 0 and lv[i] == lr[j]
        same_label += label
        same_id += tv[i] == tr[j]
        same_both += label and tv[i] == tr[j]
    return (same_both / same_label if same_label else float("nan"),
            same_both / same_id if same_id else float("nan"))


@pytest.mark.parametrize("seed", range(6))
def test_cross_modality_pairs_equal_the_literal_count(seed):
    rng = np.random.default_rng(seed)
    nv, nr = rng.integers(1, 40, size=2)
    tv, tr = rng.integers(100, 106, nv), rng.integers(103, 110, nr)
    lv, lr = rng.integers(-1, 5, nv), rng.integers(-1, 7, nr)
    got = cross_modality_pair_precision_recall(tv, lv, tr, lr)
    want = literal_pair_precision_recall(tv, lv, tr, lr)
    np.testing.assert_allclose(got, want, equal_nan=True)


def test_cross_modality_pairs_edge_cases():
    # all outliers: no pair shares a label -> precision undefined, recall 0
    p, r = cross_modality_pair_precision_recall([1, 2], [-1, -1], [1, 2], [-1, -1])
    assert np.isnan(p) and r == 0.0
    # perfect joint labels
    assert cross_modality_pair_precision_recall([5, 7], [0, 1], [7, 5, 5], [1, 0, 0]) == (1.0, 1.0)


def test_phase_timer_counts_each_second_once():
    timer = PhaseTimer()
    with timer("cluster"):
        time.sleep(0.05)
        with timer("associate"):
            time.sleep(0.5)
        time.sleep(0.05)
    # generous upper bound for a loaded machine; counting the nested phase twice would give >= 0.6
    assert 0.095 <= timer.totals["cluster"] < 0.45
    assert 0.5 <= timer.totals["associate"]


def test_modality_one_spelling():
    assert Modality.parse("visible") is VISIBLE and Modality.parse(1) is INFRARED and Modality.parse(VISIBLE) is VISIBLE
    assert VISIBLE == "visible" and f"{INFRARED}" == "infrared" and f"memory_{VISIBLE}" == "memory_visible"
    assert (VISIBLE.code, INFRARED.code) == (0, 1) and VISIBLE.other is INFRARED
    assert {"visible": 1}[VISIBLE] == 1
    with pytest.raises(ValueError, match="modality must be"):
        Modality.parse("thermal")


def test_protocol_is_a_dataset_attribute():
    from vireid_fast.data import SYSUMM01, PreparedRegDB, PreparedSYSUMM01, RegDB, SyntheticVIReID
    from vireid_fast.data.registry import VIReIDDataset

    assert SYSUMM01.protocol == SyntheticVIReID.protocol == PreparedSYSUMM01.protocol == "sysu"
    assert RegDB.protocol == PreparedRegDB.protocol == "regdb"
    # a custom dataset drops nothing unless it says so (SYSU's camera rule would be wrong for it)
    assert VIReIDDataset.protocol == "regdb" and not VIReIDDataset.gallery_trials


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_root(tmp_path_factory)


def test_non_finite_loss_stops_training_naming_the_terms(root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(str(tmp_path / "run"), "train.epochs=1", "eval.eval_untrained=false"),
                      data_root=root, log=lambda *a, **k: None, progress=False)
    step = type(trainer.method).training_step
    calls = []

    def poisoned(self, batch):
        losses = step(self, batch)
        calls.append(1)
        if len(calls) == 2:
            losses["infrared"] = losses["infrared"] * float("nan")
        return losses

    monkeypatch.setattr(type(trainer.method), "training_step", poisoned)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 2: the total loss is nan \(visible=.*"
                                                 r"infrared=nan\)"):
        trainer.fit()
    # the first iteration stepped, the poisoned one did not reach the weights
    assert all(torch.isfinite(v).all() for v in trainer.encoder.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.encoder.state_dict().items())


def test_training_images_and_ema_without_buffer_copies(root, tmp_path):
    from vireid_fast.models import EMAEncoder, small_resnet

    trainer = Trainer(tiny_config(str(tmp_path / "run")), data_root=root, log=lambda *a, **k: None, progress=False)
    images = trainer.context.images(VISIBLE, [3, 0])
    assert images.dtype == torch.uint8 and images.shape[0] == 2
    assert torch.equal(images[0], trainer.train_sets[VISIBLE][3][0])
    model = small_resnet(widths=(8, 8, 8, 16))
    model.bnneck.running_mean.fill_(1.0)
    for copy_buffers, want in ((True, 1.0), (False, 0.0)):
        ema = EMAEncoder(small_resnet(widths=(8, 8, 8, 16)), 0.5, copy_buffers=copy_buffers)
        ema.update(model)
        assert float(ema.module.bnneck.running_mean[0]) == want


def test_cluster_count_is_distinct_labels_not_the_maximum():
    from vireid_fast.methods import count_clusters

    # a joint label space: this modality holds labels 0, 4 and 7 of eight
    assert count_clusters(torch.tensor([7, 7, -1, 0, 4, 4])) == 3
    assert count_clusters(torch.tensor([-1, -1])) == 0 and count_clusters(torch.tensor([], dtype=torch.long)) == 0
