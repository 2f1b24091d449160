import os
import subprocess
import sys
import time

import pytest
import torch

from vireid_fast.config import ConfigError
from vireid_fast.engine import checkpoint
from vireid_fast.engine.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
)


def test_roundtrip_and_atomic_replace(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"a": torch.arange(5), "epoch": 1, "nested": {"x": [1, 2.5, "s"]}})
    save_checkpoint(str(path), {"a": torch.arange(6), "epoch": 2, "nested": {"x": [1]}})
    state = load_checkpoint(str(path))
    assert state["epoch"] == 2 and torch.equal(state["a"], torch.arange(6))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


@pytest.mark.parametrize("cut", [10, 60, -1, -100])
def test_truncated_file_is_detected(tmp_path, cut):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"w": torch.randn(100, 100)})
    blob = path.read_bytes()
    path.write_bytes(blob[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(path))


def test_corrupt_and_foreign_files(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"w": torch.randn(10)})
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(path))
    other = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a vireid_fast checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "none.pt"))


def killed_save(path) -> None:
    """A separate process that dies between writing its temporary file and the rename (as a kill would)."""
    code = ("import os, torch; from vireid_fast.engine import checkpoint as c; "
            "os.replace = lambda *a: os._exit(0); "
            f"c.save_checkpoint({str(path)!r}, {{'w': torch.zeros(1000)}})")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".ckpt-"))


@pytest.mark.parametrize("next_call", ["save", "load"])
def test_temp_files_of_interrupted_saves_are_removed(tmp_path, next_call):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"epoch": 1})
    killed_save(path)
    assert len(temp_files(tmp_path)) == 1  # the kill left its file (a second kill would already remove it)
    old_style = tmp_path / ".ckpt-k2j3h4x9"  # the name an older version used: only age tells
    old_style.write_bytes(b"x" * 100)
    os.utime(old_style, (time.time() - 2 * checkpoint.STALE_AFTER,) * 2)
    fresh_old_style = tmp_path / ".ckpt-abcdefgh"  # could be a save in progress elsewhere: kept
    fresh_old_style.write_bytes(b"x")
    host, token = checkpoint._HOST, checkpoint._TOKEN
    live = tmp_path / f".ckpt-{host}-{os.getppid()}-0123abcd-00000000.tmp"  # a running process's save: kept
    live.write_bytes(b"x")
    ours = tmp_path / f".ckpt-{host}-{os.getpid()}-{token}-00000001.tmp"  # this process, another thread: kept
    ours.write_bytes(b"x")
    reused = tmp_path / f".ckpt-{host}-{os.getpid()}-ffffffff-00000002.tmp"  # a killed job whose pid we got
    reused.write_bytes(b"x")
    if next_call == "save":
        save_checkpoint(str(path), {"epoch": 2})
    else:
        assert load_checkpoint(str(path))["epoch"] == 1
    assert temp_files(tmp_path) == sorted([fresh_old_style.name, live.name, ours.name])


def test_checkpoint_permissions_follow_the_umask_like_other_run_files(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(str(tmp_path / "ck.pt"), {"epoch": 1})
        with open(tmp_path / "metrics.jsonl", "w") as f:
            f.write("{}\n")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "ck.pt").st_mode & 0o777
    assert mode == os.stat(tmp_path / "metrics.jsonl").st_mode & 0o777 == 0o640


def test_missing_keys_and_foreign_payloads_are_named(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"epoch": 1, "model": {}})
    with pytest.raises(CheckpointError, match=r"ck\.pt lacks key\(s\) config, rng \(present: epoch, model\)"):
        load_checkpoint(str(path), required=("epoch", "config", "rng"))
    save_checkpoint(str(path), [1, 2])
    with pytest.raises(CheckpointError, match=r"holds a list, not the dict of a run"):
        load_checkpoint(str(path))


def test_state_dict_mismatches_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    expected = model.state_dict()
    good = {k: v.clone() for k, v in expected.items()}
    check_state_dict(expected, good, "model", "ck.pt")
    bad = dict(good)
    del bad["1.running_var"]
    bad["0.weight"] = torch.zeros(3, 5)
    bad["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=(r"^checkpoint ck\.pt: 'model' does not fit this model \(missing: "
                                               r"1\.running_var; unexpected: 2\.weight; wrong shape: 0\.weight "
                                               r"\(3, 5\) \(expected \(3, 4\)\)\); was it written with another")):
        check_state_dict(expected, bad, "model", "ck.pt")
    with pytest.raises(CheckpointError, match="'ema' must be a state dict"):
        check_state_dict(expected, [1], "ema", "ck.pt")


def test_output_dir_errors_name_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^experiment\.output_dir: '.*file' exists and is not a folder; choose"):
        prepare_output_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"^experiment\.output_dir: cannot create '.*file/run' \(Not a directory"):
        prepare_output_dir(str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match=r"^experiment\.output_dir: is empty"):
        prepare_output_dir("")
    assert prepare_output_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
