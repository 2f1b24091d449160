"""Readers on tiny fake trees of each layout, including malformed ones (exact error text), and the registry."""

import os
import shutil

import pytest

from vireid_fast.data import (
    SYSUMM01,
    DatasetError,
    ImageRecord,
    PreparedRegDB,
    PreparedSYSUMM01,
    RegDB,
    VIReIDDataset,
    create_dataset,
    get_dataset_class,
    list_datasets,
    register_dataset,
    unregister_dataset,
)

from .trees import make_prepared, make_regdb, make_sysu, write_image


def test_sysu_counts_and_order(tmp_path):
    root = str(tmp_path / "SYSU-MM01")
    expected = make_sysu(root)
    data = SYSUMM01(root)
    assert data.train_ids == [1, 2, 3] and data.val_ids == [4] and data.test_ids == [5, 6]
    assert len(data.train_visible) == expected["visible"] and len(data.train_infrared) == expected["infrared"]
    summary = data.summary()
    assert summary["train_ids"] == 4 and summary["test_ids"] == 2
    assert summary["test_visible_images"] == expected["test_visible"]
    assert summary["test_infrared_images"] == expected["test_infrared"]
    # ids sorted, then cameras 1, 2, 4, 5 in order, files sorted; id 2 has no cam1 folder
    keys = [(r.pid, r.camid, os.path.basename(r.path)) for r in data.train_visible]
    assert keys == sorted(keys) and (2, 1) not in {(r.pid, r.camid) for r in data.train_visible}
    assert {r.camid for r in data.train_infrared} == {3, 6}
    assert {r.modality for r in data.train_infrared} == {"infrared"}
    assert [r.pid for r in data.test_by_camera[3]] == sorted(r.pid for r in data.test_by_camera[3])
    first = data.train_visible[0]
    assert first == ImageRecord(os.path.join(root, "cam1", "0001", "0001.jpg"), 1, 1, "visible")
    assert data.query == [] and data.gallery == []  # the evaluation protocol builds them


def test_sysu_real_structure_in_miniature(tmp_path):
    """The real tree's shape: 296 train + 99 val ids are training ids, test ids separate, ids zero-padded."""
    root = str(tmp_path / "SYSU-MM01")
    train, val, test = tuple(range(1, 9)), (9, 10, 11), (12, 13)
    counts = {(p, c): 3 if c in (3, 6) else 5 for p in train + val + test for c in range(1, 7)}
    make_sysu(root, train=train, val=val, test=test, counts=counts)
    data = create_dataset("sysu_mm01", root)
    assert data.summary()["train_ids"] == 11
    assert len(data.train_visible) == 11 * 4 * 5 and len(data.train_infrared) == 11 * 2 * 3


def test_sysu_malformed_tree_lists_every_problem(tmp_path):
    root = tmp_path / "SYSU-MM01"
    make_sysu(str(root))
    (root / "exp" / "train_id.txt").write_text("1,2,x,3,,4b\n")
    (root / "exp" / "val_id.txt").unlink()
    (root / "exp" / "test_id.txt").write_text("5,6,7,3")
    shutil.rmtree(root / "cam3")
    shutil.rmtree(root / "cam6")
    (root / "cam6").mkdir()
    with pytest.raises(DatasetError) as info:
        SYSUMM01(str(root))
    assert str(info.value) == (
        f"sysu_mm01 at {root}: 6 problems found:\n"
        "  - exp/train_id.txt: not integer ids: 'x' (item 3), '4b' (item 6)\n"
        "  - missing exp/val_id.txt (one comma-separated line of integer ids)\n"
        "  - ids in both training (train/val) and exp/test_id.txt: 3\n"
        "  - missing camera folder cam3 (infrared)\n"
        "  - camera folder cam6 has no images (expected cam6/<pid:04d>/<nnnn>.jpg)\n"
        "  - test ids with no images in any camera (looked for cam1..cam6/<pid:04d>/): 7")
    assert len(info.value.problems) == 6


def test_missing_root_and_empty_id_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        SYSUMM01(str(tmp_path / "nowhere"))
    root = tmp_path / "s"
    make_sysu(str(root))
    (root / "exp" / "val_id.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"  - exp/val_id.txt lists no ids$"):
        SYSUMM01(str(root))


def test_prepared_sysu(tmp_path):
    root = str(tmp_path / "sysu")
    expected = make_prepared(root)
    data = create_dataset("sysu_mm01_prepared", root)
    assert isinstance(data, PreparedSYSUMM01)
    assert len(data.train_visible) == expected["visible", "bounding_box_train"] == 6
    assert len(data.train_infrared) == expected["infrared", "bounding_box_train"]
    assert all(r.pid != -1 for r in data.train)  # junk skipped
    assert {(r.pid, r.camid) for r in data.train_infrared} == {(p, c) for p in (1, 2, 3) for c in (3, 6)}
    assert {r.modality for r in data.query} == {"infrared"} and {r.modality for r in data.gallery} == {"visible"}
    flipped = PreparedSYSUMM01(root, query_modality="visible")
    assert {r.modality for r in flipped.query} == {"visible"}


def test_prepared_malformed(tmp_path):
    root = tmp_path / "sysu"
    make_prepared(str(root))
    shutil.rmtree(root / "ir_modify" / "bounding_box_train")
    write_image(str(root / "rgb_modify" / "bounding_box_train" / "front.jpg"))
    write_image(str(root / "rgb_modify" / "bounding_box_train" / "a_b.jpg"))
    for name in os.listdir(root / "rgb_modify" / "bounding_box_test"):
        os.remove(root / "rgb_modify" / "bounding_box_test" / name)
    with pytest.raises(DatasetError) as info:
        PreparedSYSUMM01(str(root))
    assert str(info.value) == (
        f"sysu_mm01_prepared at {root}: 3 problems found:\n"
        "  - rgb_modify/bounding_box_train: 2 file name(s) do not match '{pid}_c{cam}_...' "
        r"(pattern ([-\d]+)_c(\d)): a_b.jpg, front.jpg" "\n"
        "  - rgb_modify/bounding_box_test has no images\n"
        "  - missing folder ir_modify/bounding_box_train")


def test_prepared_regdb_trials(tmp_path):
    root = str(tmp_path / "regdb")
    make_prepared(root, trial=3, ext=".bmp")
    data = PreparedRegDB(root, trial=3)
    assert len(data.train_visible) == 3 and {r.camid for r in data.train_visible} == {1}
    assert {r.modality for r in data.query} == {"visible"} and {r.modality for r in data.gallery} == {"infrared"}
    with pytest.raises(DatasetError, match=r"missing folder rgb_modify/1/bounding_box_train"):
        PreparedRegDB(root, trial=1)
    with pytest.raises(ValueError, match="trial must be an integer in 1..10, got 11"):
        PreparedRegDB(root, trial=11)


def test_regdb_original_counts(tmp_path):
    """Miniature of a trial: half of the ids train (206 of 412 on the real set), 10 + 10 images each."""
    root = str(tmp_path / "RegDB")
    make_regdb(root, trial=2, train_ids=tuple(range(0, 8)), test_ids=tuple(range(8, 16)), per_id=10)
    data = create_dataset("regdb", root, trial=2)
    assert data.summary()["train_ids"] == 8
    assert len(data.train_visible) == len(data.train_infrared) == 80
    assert {r.camid for r in data.train_visible} == {1} and {r.camid for r in data.train_infrared} == {2}
    assert len(data.query) == len(data.gallery) == 80
    assert data.query[0].modality == "visible" and data.gallery[0].modality == "infrared"
    reverse = RegDB(root, trial=2, query_modality="infrared")
    assert reverse.query[0].modality == "infrared"


def test_regdb_malformed_lines_and_missing_files(tmp_path):
    root = tmp_path / "RegDB"
    make_regdb(str(root))
    with open(root / "idx" / "train_visible_1.txt", "a") as f:
        f.write("Visible/9/extra.bmp 3 4\nVisible/9/nolabel.bmp\nVisible/9/bad.bmp x\n")
    (root / "Thermal" / "1" / "thermal_0_1.bmp").unlink()
    (root / "idx" / "test_thermal_1.txt").unlink()
    with pytest.raises(DatasetError) as info:
        RegDB(str(root), trial=1)
    assert str(info.value) == (
        f"regdb at {root}: 3 problems found:\n"
        "  - idx/train_visible_1.txt: 3 malformed line(s), expected 'relative/path label': "
        "line 7: 'Visible/9/extra.bmp 3 4', line 8: 'Visible/9/nolabel.bmp', line 9: 'Visible/9/bad.bmp x'\n"
        f"  - idx/train_thermal_1.txt: 1 listed image(s) not found under {root}: Thermal/1/thermal_0_1.bmp\n"
        "  - missing idx/test_thermal_1.txt (lines 'relative/path label')")


def test_registry_round_trip(tmp_path):
    for k in range(3):
        write_image(str(tmp_path / "rgb" / "7" / f"{k}.png"), k)
        write_image(str(tmp_path / "ir" / "7" / f"{k}.png"), k)

    @register_dataset("test_my_lab")
    class MyLab(VIReIDDataset):
        def load(self):
            for modality, folder, camid in (("visible", "rgb", 1), ("infrared", "ir", 2)):
                for pid in sorted(os.listdir(os.path.join(self.root, folder))):
                    for name in sorted(os.listdir(os.path.join(self.root, folder, pid))):
                        self.add_train(os.path.join(folder, pid, name), int(pid), camid, modality)

    try:
        assert "test_my_lab" in list_datasets() and get_dataset_class("test_my_lab") is MyLab
        data = create_dataset("test_my_lab", str(tmp_path))
        assert data.name == "test_my_lab" and len(data.train_visible) == 3 and len(data.train_infrared) == 3
        assert data.train_infrared[0].path == os.path.join(str(tmp_path), "ir", "7", "0.png")
        with pytest.raises(ValueError, match="already registered by .*MyLab; choose another name"):
            register_dataset("test_my_lab")(type("Other", (VIReIDDataset,), {}))
        with pytest.raises(TypeError, match="needs a subclass of VIReIDDataset"):
            register_dataset("test_plain")(dict)
    finally:
        unregister_dataset("test_my_lab")
    with pytest.raises(ValueError, match="unknown dataset 'test_my_lab'; registered: regdb, regdb_prepared"):
        create_dataset("test_my_lab", str(tmp_path))


def test_custom_dataset_without_infrared_is_rejected(tmp_path):
    class OnlyVisible(VIReIDDataset):
        name = "only_visible"

        def load(self):
            self.add_train("a.png", 1, 1, "visible")

    with pytest.raises(DatasetError, match="1 problem found:\n  - no infrared training images were found"):
        OnlyVisible(str(tmp_path))
    with pytest.raises(ValueError, match="modality must be 'visible' or 'infrared', got 'rgb'"):
        type("Bad", (VIReIDDataset,), {"load": lambda self: self.add_train("a.png", 1, 1, "rgb")})(str(tmp_path))


def test_binary_list_files_are_named_problems(tmp_path):
    """A binary exp/*_id.txt or RegDB idx file: one DatasetError naming the file, not a bare UnicodeDecodeError."""
    root = tmp_path / "s"
    make_sysu(str(root))
    (root / "exp" / "train_id.txt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    (root / "exp" / "val_id.txt").write_bytes(b"4\x00\x00")
    (root / "exp" / "test_id.txt").write_bytes(b"\xef\xbb\xbf5,6\r\n")  # a BOM and CRLF are fine
    with pytest.raises(DatasetError) as info:
        SYSUMM01(str(root))
    assert info.value.problems == [
        "exp/train_id.txt: not UTF-8 text (byte 0xff at offset 0); it must be a plain-text list: is it a binary or "
        "mis-named file?",
        "exp/val_id.txt: contains NUL bytes (offset 1); it must be a plain-text list: is it a binary or mis-named "
        "file?",
    ]
    regdb = tmp_path / "RegDB"
    make_regdb(str(regdb))
    (regdb / "idx" / "test_visible_1.txt").write_bytes(b"Visible/4/visible_3_0.bmp 3\n\x89PNG\x1a\n")
    with pytest.raises(DatasetError, match=r"idx/test_visible_1.txt: not UTF-8 text \(byte 0x89 at offset 28\)"):
        RegDB(str(regdb))


def test_regdb_paths_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "RegDB"
    make_regdb(str(root))
    write_image(str(tmp_path / "elsewhere.bmp"))
    with open(root / "idx" / "train_visible_1.txt", "a") as f:
        f.write(f"{tmp_path / 'elsewhere.bmp'} 1\n../elsewhere.bmp 1\nVisible/../../elsewhere.bmp 2\n"
                f"{root / 'Visible' / '1' / 'visible_0_0.bmp'} 0\nVisible/1/../1/visible_0_1.bmp 0\n")
    with pytest.raises(DatasetError) as info:
        RegDB(str(root))
    assert info.value.problems == [
        f"idx/train_visible_1.txt: 3 path(s) outside the dataset root {root} (absolute or '..' paths are refused; "
        f"list images relative to the root): line 7: '{tmp_path / 'elsewhere.bmp'}', line 8: '../elsewhere.bmp', "
        "line 9: 'Visible/../../elsewhere.bmp'"]
    with open(root / "idx" / "train_visible_1.txt") as f:
        lines = f.read().splitlines()
    with open(root / "idx" / "train_visible_1.txt", "w") as f:
        f.write("\n".join(lines[:6] + lines[9:]) + "\n")
    data = RegDB(str(root))  # absolute or '..' paths that stay inside the root are fine
    assert [r.path for r in data.train_visible[-2:]] == [str(root / "Visible" / "1" / "visible_0_0.bmp"),
                                                        str(root / "Visible" / "1" / "visible_0_1.bmp")]
