import pytest

from vireid_fast.cli import DEMO_CONFIG, main


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "make-synthetic", "bench"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "key=value" in capsys.readouterr().out


def test_print_config_with_overrides(capsys):
    assert main(["train", "--print-config", "train.epochs=7", "cluster.eps=0.45", "--output-dir", "/tmp/x"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "eps: 0.45" in out and "output_dir: /tmp/x" in out
    assert "dataset: synthetic" in out  # no --config: the demo config


def test_bad_override_names_the_key(capsys):
    assert main(["train", "--print-config", "train.lr=-3"]) == 2
    assert "train.lr: must be > 0" in capsys.readouterr().err
    assert main(["train", "--print-config", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_demo_config_exists():
    import os

    assert os.path.isfile(DEMO_CONFIG)


def test_make_synthetic(tmp_path):
    assert main(["make-synthetic", "--out", str(tmp_path / "syn"), "--size", "tiny", "--ids", "6"]) == 0
    assert (tmp_path / "syn" / "synthetic.json").exists()
    assert main(["make-synthetic", "--out", str(tmp_path / "syn"), "--size", "tiny", "--ids", "6"]) == 0  # reused


def test_train_then_eval_from_the_command_line(tmp_path_factory, tmp_path, capsys):
    from tests.engine.tiny import TINY_OVERRIDES, tiny_root

    root = tiny_root(tmp_path_factory)
    out = tmp_path / "run"
    args = ["train", "--data-root", root, "--output-dir", str(out), "--no-progress", *TINY_OVERRIDES,
            "train.epochs=1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "untrained" in text and "trained (epoch 1)" in text and "extract" in text
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-root", root]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(epoch 1)" in line and "mAP" in line and "mINP" in line
    assert main(["train", "--data-root", root, "--output-dir", str(out), "--no-progress", "--resume", *TINY_OVERRIDES,
                 "train.epochs=2"]) == 0
    assert "trained (epoch 2)" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-root", root, "--rerank"]) == 0
    assert "with re-ranking" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--rerank", "--cmfp", "3"]) == 2
