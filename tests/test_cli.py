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


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["train.lr=.nan"], "error: train.lr: must be a finite number, got nan"),
    (["cluster.eps=.nan"], "error: cluster.eps: must be a finite number, got nan"),
    (["method.temp=.nan"], "error: method.temp: must be a finite number, got nan"),
    (["model.gem_p=.inf"], "error: model.gem_p: must be a finite number, got inf"),
    (["data.dataset=nope"], "error: data.dataset: unknown dataset 'nope'; registered: regdb"),
    (["data.dataset=sysu_mm01"], "error: data.root: is empty; pass --data-root DIR"),
    (["data.dataset=sysu_mm01", "--data-root", "/nonexistent/sysu"],
     "error: sysu_mm01 at /nonexistent/sysu: 1 problem found: folder /nonexistent/sysu does not exist"),
    (["data.dataset=regdb", "--data-root", "{tmp}"], "error: regdb at {tmp}: 4 problems found: missing idx/train_vis"),
    (["--output-dir", "{tmp}/file"], "error: experiment.output_dir: '{tmp}/file' exists and is not a folder"),
    (["--output-dir", "{tmp}/file/run"], "error: experiment.output_dir: cannot create '{tmp}/file/run' (Not a dir"),
    (["--config", "{tmp}/method.yaml"], "error: method: must be a mapping of keys to values, got 'dcl'"),
    (["--config", "{tmp}/none.yaml"], "error: config file {tmp}/none.yaml not found"),
    (["--resume", "{tmp}/none.pt"], "error: checkpoint {tmp}/none.pt not found"),
])
def test_train_user_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "method.yaml").write_text("method: dcl\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "run")]
    assert main(["train", "--no-progress", *args]) == 2
    assert only_error_line(capsys).startswith(message.replace("{tmp}", str(tmp_path)))


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["train", "experiment.device=cuda", "--output-dir", str(tmp_path)]) == 2
    assert only_error_line(capsys) == ("error: experiment.device: cuda, but no CUDA device is available; use "
                                       "experiment.device=cpu (or auto)")


def test_eval_and_make_synthetic_user_errors_are_one_line(tmp_path, capsys):
    from vireid_fast.engine import save_checkpoint

    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--ids", "-5"]) == 2
    assert only_error_line(capsys) == "error: make-synthetic --ids: must be >= 0 (0 = the preset's), got -5"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["make-synthetic", "--out", str(tmp_path / "full"), "--size", "tiny"]) == 2
    assert "holds no complete synthetic dataset" in only_error_line(capsys)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert only_error_line(capsys).startswith(f"error: checkpoint {tmp_path / 'none.pt'} not found")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 300)
    assert main(["eval", "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "is not a vireid_fast checkpoint" in only_error_line(capsys)
    save_checkpoint(str(tmp_path / "keys.pt"), {"epoch": 3})
    assert main(["eval", "--checkpoint", str(tmp_path / "keys.pt")]) == 2
    assert "keys.pt lacks key(s) config (present: epoch)" in only_error_line(capsys)
    save_checkpoint(str(tmp_path / "cfg.pt"), {"epoch": 3, "config": {"train": {"lr": -1.0}}})
    assert main(["eval", "--checkpoint", str(tmp_path / "cfg.pt")]) == 2
    assert "cfg.pt: its config does not validate (train.lr: must be > 0" in only_error_line(capsys)
    assert main(["eval", "--checkpoint", str(tmp_path / "cfg.pt"), "--trials", "0"]) == 2
    assert only_error_line(capsys) == "error: eval --trials: must be >= 1, got 0"


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    args = ["train", "--print-config", "train.lr=.nan"]
    if how == "env":
        monkeypatch.setenv("VIREID_DEBUG", "1")
    else:
        args = ["--debug", *args] if how == "flag-before" else [*args, "--debug"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ConfigError: train.lr" in err
    assert err.strip().splitlines()[-1].startswith("error: train.lr: must be a finite number")
    monkeypatch.delenv("VIREID_DEBUG", raising=False)
    assert main(["train", "--print-config", "train.lr=.nan"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    import vireid_fast.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_make_synthetic", broken)
    with pytest.raises(ZeroDivisionError):
        main(["make-synthetic", "--size", "tiny"])


@pytest.mark.parametrize("args, message", [
    (["make-synthetic", "--size", "huge"], "error: vireid-fast make-synthetic: argument --size: invalid choice: "
                                           "'huge'"),
    (["make-synthetic", "--ids", "many"], "error: vireid-fast make-synthetic: argument --ids: invalid int value"),
    (["eval"], "error: vireid-fast eval: the following arguments are required: --checkpoint"),
    (["nope"], "error: vireid-fast: argument command: invalid choice: 'nope'"),
])
def test_argument_errors_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    line = only_error_line(capsys)
    assert line.startswith(message) and line.endswith("--help)"), line
