import pytest
import torch

from vireid_fast.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


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
