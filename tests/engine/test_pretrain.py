import dataclasses
import json
import os

import pytest
import torch

from vireid_fast.cli import DEMO_CONFIG, main
from vireid_fast.config import load_config
from vireid_fast.data.synthetic import SIZES, make_identity
from vireid_fast.engine import pretrain as pt
from vireid_fast.models import build_model, load_pretrained

TINY = ["ids=6", "size=tiny", "epochs=2", "widths=[8,16,16,32]", "batch_size=8", "image_size=[32,16]"]


def quiet(*args, **kwargs):
    pass


def demo_model_and_size():
    config = load_config(DEMO_CONFIG)
    m = config.model
    model = build_model(m.arch, widths=tuple(m.widths), non_local=m.non_local, last_stride=m.last_stride,
                        gem_p=m.gem_p)
    return config, model, tuple(config.data.image_size)


def shipped_record(config_hash: str):
    for name in sorted(os.listdir(pt.SHIPPED_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(pt.SHIPPED_DIR, name)) as f:
                record = json.load(f)
            if record["config_hash"] == config_hash:
                return os.path.join(pt.SHIPPED_DIR, name[:-5] + ".pth"), record
    return None, None


def identity_params(seed: int, pid: int) -> tuple:
    return tuple(v for k, v in dataclasses.asdict(make_identity(seed, pid)).items() if k != "pid")


def test_pool_is_disjoint_from_every_demo_identity():
    config, model, size = demo_model_and_size()
    recipe = pt.config_for_model(model, size)
    demo_seed = config.experiment.seed
    demo_ids = config.data.synthetic_ids or SIZES[config.data.synthetic_size].ids
    # Every generated value (identity parameters, image noise) is drawn from (dataset seed, pid, ...): the pool's
    # dataset seed lies above every seed a target set can use.
    assert recipe.pool_seed >= pt.POOL_SEED_OFFSET > demo_seed
    demo = {identity_params(demo_seed, pid) for pid in range(1, demo_ids + 1)}
    pool = {identity_params(recipe.pool_seed, pid) for pid in range(1, recipe.ids + 1)}
    assert len(demo) == demo_ids and len(pool) == recipe.ids
    assert not demo & pool
    with pytest.raises(pt.PretrainConfigError, match="seed"):
        pt.make_config([f"seed={pt.POOL_SEED_OFFSET}"])


def test_tiny_pretrain_is_bit_identical_and_leaves_the_rng_alone(tmp_path, monkeypatch):
    config = pt.make_config(TINY)
    states, files = [], []
    for run, global_seed in (("a", 123), ("b", 456)):  # the weights must not depend on the caller's RNG state
        monkeypatch.setenv("VIREID_CACHE", str(tmp_path / run))
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        result = pt.pretrain(config, log=quiet, progress=False)
        assert torch.equal(torch.get_rng_state(), before)
        assert result.path.startswith(str(tmp_path / run)) and os.path.basename(
            os.path.dirname(result.path)) == f"pretrain-{config.hash()}"
        states.append(torch.load(result.path, weights_only=True))
        files.append(pt.sha256_file(result.path))
        assert result.record["sha256"] == files[-1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert files[0] == files[1]
    # It learned: the stem moved away from its initialisation and the training accuracy was recorded.
    torch.manual_seed(config.seed)
    fresh = build_model("small_resnet", widths=tuple(config.widths), non_local=False)
    assert not torch.equal(fresh.visible_stem.conv1.weight, states[0]["conv1.weight"])
    assert len(result.record["history"]) == config.epochs
    # Cached: a second call returns the same file without training.
    monkeypatch.setattr(pt, "train_encoder", lambda *a, **k: pytest.fail("retrained a cached config"))
    assert pt.pretrain(config, log=quiet).path == result.path


def test_weights_load_like_a_torchvision_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("VIREID_CACHE", str(tmp_path))
    config = pt.make_config(TINY + ["epochs=1"])
    path = pt.pretrain(config, log=quiet, progress=False).path
    state = torch.load(path, weights_only=True)
    assert "conv1.weight" in state and "bnneck.running_mean" in state
    assert not any(k.startswith(("visible_stem", "infrared_stem", "fc")) for k in state)
    model = build_model("small_resnet", widths=tuple(config.widths), non_local=False)
    report = load_pretrained(model, path, verbose=False)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert torch.equal(model.visible_stem.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.infrared_stem.bn1.running_var, state["bn1.running_var"])
    assert torch.equal(model.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


def test_shipped_checkpoint_matches_its_record_and_the_current_code(monkeypatch):
    config, model, size = demo_model_and_size()
    assert config.model.pretrained == "synthetic"
    recipe = pt.config_for_model(model, size)
    path, record = shipped_record(recipe.hash())
    regenerate = recipe.command("vireid_fast/models/pretrained/<name>.pth")
    assert record is not None, (f"no shipped checkpoint records config hash {recipe.hash()} (the demo's pretraining "
                                f"changed?); regenerate it: {regenerate}")
    assert os.path.getsize(path) < 2_000_000
    assert pt.sha256_file(path) == record["sha256"]
    assert record["config"] == recipe.to_dict() and record["threads"] == recipe.threads
    assert pt.make_config(record["command"].split()[4:]) == recipe  # the recorded command rebuilds the config
    # model.pretrained=synthetic resolves to the shipped file without training anything.
    monkeypatch.setattr(pt, "train_encoder", lambda *a, **k: pytest.fail("trained instead of using the shipped file"))
    report = load_pretrained(model, "synthetic", verbose=False, image_size=size)
    assert report.path == path and not report.missing and not report.unexpected


def test_keyword_for_an_unsupported_model_names_the_fix():
    model = build_model("small_resnet", widths=(8, 16, 16, 32), layers=(2, 1, 1, 1))
    with pytest.raises(ValueError, match="small_resnet with one basic block"):
        load_pretrained(model, "synthetic", verbose=False)


def test_bad_settings_name_the_key():
    for override, key in (("epochs=0", "epochs"), ("channel_augmentation=gray", "channel_augmentation"),
                          ("modalities=thermal", "modalities"), ("lr=-1", "lr"), ("widths=[8,16]", "widths")):
        with pytest.raises(pt.PretrainConfigError, match=f"pretrain {key}="):
            pt.make_config([override])
    with pytest.raises(pt.PretrainConfigError, match="unknown pretrain key"):
        pt.make_config(["epoch=3"])


def test_cli_pretrain_writes_weights_and_record(tmp_path, tmp_path_factory, monkeypatch, capsys):
    from .tiny import tiny_config, tiny_root

    monkeypatch.setenv("VIREID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w" / "tiny.pth"
    assert main(["pretrain", "--out", str(out), "--no-progress", *TINY, "epochs=1",
                 "channel_augmentation=exchange", "channel_p=0.5"]) == 0
    record = json.loads((tmp_path / "w" / "tiny.json").read_text())
    assert pt.sha256_file(str(out)) == record["sha256"]
    assert record["config"]["channel_augmentation"] == "exchange" and f"--out {out}" in record["command"]
    assert f"weights: {out}" in capsys.readouterr().out
    target = tmp_path / "target.yaml"
    target.write_text(tiny_config(str(tmp_path / "run"), f"data.root={tiny_root(tmp_path_factory)}").to_yaml())
    assert main(["pretrain", "--ari", "--target", str(target), "--no-progress", *TINY, "epochs=1",
                 "channel_augmentation=exchange", "channel_p=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "pretrained weights (cached)" in printed and "first-epoch pseudo-label ARI: visible " in printed
    assert main(["pretrain", "epochs=zero"]) == 2
    assert "pretrain epochs='zero'" in capsys.readouterr().err


def test_keyword_generates_on_first_use_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIREID_CACHE", str(tmp_path))
    monkeypatch.setattr(pt, "SYNTHETIC_RECIPE", {"ids": 6, "size": "tiny", "epochs": 1, "batch_size": 8})
    model = build_model("small_resnet", widths=(8, 16, 16, 32))
    report = load_pretrained(model, "synthetic", verbose=False, image_size=(32, 16), log=quiet)
    expected = pt.config_for_model(model, (32, 16))
    assert expected.ids == 6 and expected.widths == [8, 16, 16, 32]
    assert report.path == pt.cached_path(expected) and os.path.isfile(report.path)
    monkeypatch.setattr(pt, "train_encoder", lambda *a, **k: pytest.fail("retrained a cached config"))
    again = build_model("small_resnet", widths=(8, 16, 16, 32))
    assert load_pretrained(again, "synthetic", verbose=False, image_size=(32, 16), log=quiet).path == report.path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_first_epoch_ari_matches_the_trainers_first_epoch(tmp_path, tmp_path_factory, monkeypatch):
    from vireid_fast.engine import Trainer

    from .tiny import tiny_config, tiny_root

    monkeypatch.setenv("VIREID_CACHE", str(tmp_path / "cache"))
    weights = pt.pretrain(pt.make_config(TINY), log=quiet, progress=False).path
    config = tiny_config(str(tmp_path / "run"), f"data.root={tiny_root(tmp_path_factory)}", "train.epochs=1",
                         "eval.eval_untrained=false")
    measured = pt.first_epoch_ari(config, weights, log=quiet)
    trainer = Trainer(tiny_config(str(tmp_path / "run"), f"data.root={tiny_root(tmp_path_factory)}",
                                  "train.epochs=1", "eval.eval_untrained=false", f"model.pretrained={weights}"),
                      log=quiet, progress=False)
    row = trainer.run_epoch(0)
    assert measured == {"visible": row["ari/visible"], "infrared": row["ari/infrared"]}
