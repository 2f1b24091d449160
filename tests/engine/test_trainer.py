import json
import os

import pytest
import torch

from vireid_fast.engine import CheckpointError, Trainer

from .tiny import tiny_config, tiny_root


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
    assert epoch["clusters/visible"] > 0 and epoch["clusters/infrared"] > 0
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
    original = Trainer.run_epoch

    def die_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", die_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    monkeypatch.setattr(Trainer, "run_epoch", original)

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
