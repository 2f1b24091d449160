import json
import math
import os
import shutil

import pytest
import torch

from vireid_fast.engine import CheckpointError, Trainer

from .tiny import kill_during_epoch, tiny_config, tiny_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_root(tmp_path_factory)


def quiet(*args, **kwargs):
    pass


def test_one_epoch_end_to_end(root, tmp_path):
    config = tiny_config(str(tmp_path / "run"), "train.epochs=1")
    trainer = Trainer(config, data_root=root, log=quiet, progress=False)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    summary = trainer.fit()
    assert set(summary) >= {"untrained", "trained"}
    for key in ("rank1", "mAP", "mINP"):
        assert 0.0 <= summary["trained"][key] <= 100.0
    changed = [k for k, v in trainer.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("layer") for k in changed) and any(k.startswith("visible_stem") for k in changed)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]
    epoch = rows[1]
    for key in ("loss/visible", "loss/augmented", "loss/infrared", "clusters/visible", "outliers/infrared",
                "ari/visible", "nmi/infrared", "rank1", "mAP", "mINP", "time/extract", "time/cluster",
                "time/train", "time/eval"):
        assert key in epoch, key
    # Training ran on real clusters with a finite, non-degenerate loss (a NaN or an all-zero loss, e.g. from one
    # cluster holding everything, fails here) whose parts add up to the total.
    losses = {k: v for k, v in epoch.items() if k.startswith("loss/")}
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert epoch["loss/total"] == pytest.approx(sum(v for k, v in losses.items() if k != "loss/total"), rel=1e-5)
    assert 1 < epoch["clusters/visible"] < len(trainer.train_sets["visible"])
    assert 1 < epoch["clusters/infrared"] < len(trainer.train_sets["infrared"])
    assert epoch["nmi/visible"] > 0 and epoch["nmi/infrared"] > 0
    # The evaluation changed with the weights (the trained model is evaluated, not the untrained one again).
    assert any(rows[0][k] != rows[1][k] for k in ("rank1", "mAP", "mINP"))
    for name in ("curves.png", "cmc.png", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists(), name
    labels = trainer.labels
    assert labels["visible"].shape == (len(trainer.train_sets["visible"]),)
    assert "untrained" in trainer.report() and "extract" in trainer.report()


def test_resume_after_kill_equals_uninterrupted(root, tmp_path, monkeypatch):
    full = Trainer(tiny_config(str(tmp_path / "full"), "train.epochs=2"), data_root=root, log=quiet, progress=False)
    full.fit()

    killed = Trainer(tiny_config(str(tmp_path / "killed"), "train.epochs=2"), data_root=root, log=quiet,
                     progress=False)
    kill_during_epoch(killed, 1, monkeypatch)

    # A fresh process state: a different global RNG must not matter after resuming.
    torch.manual_seed(12345)
    resumed = Trainer(tiny_config(str(tmp_path / "killed"), "train.epochs=2"), data_root=root, log=quiet,
                      progress=False, resume=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    a, b = full.encoder.state_dict(), resumed.encoder.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for m in ("visible", "infrared"):
        assert torch.equal(full.labels[m], resumed.labels[m])
        assert torch.equal(full.method.memories[m], resumed.method.memories[m])
    assert full.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    rows = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_resume_refuses_other_config_and_truncated_file(root, tmp_path):
    out = str(tmp_path / "run")
    Trainer(tiny_config(out, "train.epochs=1", "eval.eval_untrained=false"), data_root=root, log=quiet,
            progress=False).fit()
    with pytest.raises(CheckpointError, match=r"another config.*cluster.eps: 0.7 -> 0.5"):
        Trainer(tiny_config(out, "train.epochs=2", "cluster.eps=0.5"), data_root=root, log=quiet, resume=True)
    path = os.path.join(out, "checkpoint.pt")
    from vireid_fast.engine import load_checkpoint, save_checkpoint

    good = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in good.items() if k not in ("optimizer", "rng")})
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt lacks key\(s\) optimizer, rng \(present: "):
        Trainer(tiny_config(out, "train.epochs=2"), data_root=root, log=quiet, resume=True)
    model = dict(good["model"])
    model["layer1.0.conv1.weight"] = model["layer1.0.conv1.weight"][:, :1]
    del model["bnneck.running_mean"]
    save_checkpoint(path, {**good, "model": model})
    with pytest.raises(CheckpointError, match=r"'model' does not fit this model \(missing: bnneck\.running_mean; "
                                              r"wrong shape: layer1\.0\.conv1\.weight \(8, 1, 3, 3\)"):
        Trainer(tiny_config(out, "train.epochs=2"), data_root=root, log=quiet, resume=True)
    save_checkpoint(path, {**good, "optimizer": {"state": {}, "param_groups": []}})
    with pytest.raises(CheckpointError, match=r"training state does not fit this trainer \(ValueError: "):
        Trainer(tiny_config(out, "train.epochs=2"), data_root=root, log=quiet, resume=True)
    save_checkpoint(path, good)
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(tiny_config(out, "train.epochs=2"), data_root=root, log=quiet, resume=True)


def test_ema_encoder_follows_and_is_checkpointed(root, tmp_path):
    from vireid_fast.engine import load_checkpoint

    out = tmp_path / "ema"
    trainer = Trainer(tiny_config(str(out), "train.epochs=1", "eval.eval_untrained=false", "model.use_ema=true",
                                  "model.ema_beta=0.5"), data_root=root, log=quiet, progress=False)
    initial = trainer.ema.module.layer1[0].conv1.weight.clone()
    trainer.fit()
    ema_weight = trainer.ema.module.layer1[0].conv1.weight
    assert not torch.equal(ema_weight, initial)
    assert not torch.equal(ema_weight, trainer.encoder.layer1[0].conv1.weight)
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert torch.equal(state["ema"]["layer1.0.conv1.weight"], ema_weight)


def truncate(path) -> None:
    with open(path, "rb") as f:
        head = f.read(60)
    with open(path, "wb") as f:
        f.write(head)


def test_skip_bad_images_drops_and_counts_them(root, tmp_path, capsys):
    from tests.engine.tiny import TINY_OVERRIDES
    from vireid_fast.cli import main

    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad_train = data / "cam1" / "0001" / "0001.jpg"
    bad_query = data / "cam3" / "0004" / sorted(os.listdir(data / "cam3" / "0004"))[0]
    truncate(bad_train)
    truncate(bad_query)
    out = tmp_path / "run"
    # Without the key: one line naming the file and the fix, exit status 2 (was a 24-frame traceback).
    assert main(["train", "--data-root", str(data), "--output-dir", str(out), "--no-progress", *TINY_OVERRIDES,
                 "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 unreadable image file(s): ") and "0004" in err[0], err
    assert "data.skip_bad_images=true" in err[0]

    lines = []
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image"):
        trainer = Trainer(tiny_config(str(out), "train.epochs=1", "data.skip_bad_images=true"), data_root=str(data),
                          log=lines.append, progress=False)
    assert [line for line in lines if line.startswith("skipped")] == [
        f"skipped 2 unreadable image(s) (data.skip_bad_images): {bad_train} (OSError: Truncated File Read), "
        f"{bad_query} (OSError: Truncated File Read)"], lines
    reference = Trainer(tiny_config(str(tmp_path / "ref"), "train.epochs=1"), data_root=root, log=quiet,
                        progress=False)
    assert len(trainer.train_sets["visible"]) == len(reference.train_sets["visible"]) - 1
    assert str(bad_train) not in {r.path for r in trainer.train_sets["visible"].records}
    assert len(trainer.test_set.query) == len(reference.test_set.query) - 1
    assert len(trainer.test_set.gallery) == len(reference.test_set.gallery)
    summary = trainer.fit()
    assert math.isfinite(summary["trained"]["mAP"])


def test_reported_label_spaces_decide_the_cross_modality_pair_report(root, tmp_path, monkeypatch):
    # DCL links nothing (two label spaces): no xmod entries. A method whose main reported space ("") puts every image
    # of both modalities in one cluster gets precision = share of same-identity pairs and recall 1 — computed on that
    # space, not on the training labels; a named space is reported under its name.
    import numpy as np

    from vireid_fast.methods import DCL

    trainer = Trainer(tiny_config(str(tmp_path / "a")), data_root=root, log=quiet, progress=False)
    row = {}
    trainer.prepare_epoch(0, row)
    assert "xmod/precision" not in row
    monkeypatch.setattr(DCL, "shared_label_spaces", lambda self, labels: {
        "": tuple(torch.zeros_like(labels[m]) for m in ("visible", "infrared")),
        "apart": (torch.zeros_like(labels["visible"]), torch.ones_like(labels["infrared"]))})
    trainer = Trainer(tiny_config(str(tmp_path / "b")), data_root=root, log=quiet, progress=False)
    row = {}
    trainer.prepare_epoch(0, row)
    truth = trainer.ground_truth()
    same = (truth["visible"][:, None] == truth["infrared"][None]).mean()
    assert row["xmod/precision"] == pytest.approx(float(same)) and row["xmod/recall"] == 1.0
    assert row["xmod/apart/recall"] == 0.0
    assert len(np.unique(trainer.labels["visible"].numpy())) > 1  # training labels untouched


def test_a_methods_own_timed_phase_reaches_the_epoch_row(root, tmp_path, monkeypatch):
    # A nested phase pauses its parent, so if the row kept only the engine's phases its seconds would be lost.
    import time

    from vireid_fast.methods import DCL

    original = DCL.build_memories

    def build_memories(self, features, labels):
        with self.ctx.timed("own_phase"):
            time.sleep(0.05)
        return original(self, features, labels)

    monkeypatch.setattr(DCL, "build_memories", build_memories)
    trainer = Trainer(tiny_config(str(tmp_path / "run")), data_root=root, log=quiet, progress=False)
    row = trainer.run_epoch(0)
    assert row["time/own_phase"] >= 0.05 and row["time/memory"] < row["time/own_phase"] + 1.0
