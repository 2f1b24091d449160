import os
import random

import numpy as np
import pytest

from vireid_fast.eval import (
    evaluate,
    evaluate_trials,
    regdb_split,
    summarize_trials,
    sysu_gallery,
    sysu_query,
    sysu_test_ids,
)

# id -> camera -> number of images (None: folder absent; 0: empty folder). Id 99 is a training id.
TREE = {
    3: {1: 12, 2: 3, 3: 4, 4: None, 5: 1, 6: 2},
    7: {1: 5, 2: None, 3: None, 4: 10, 5: 11, 6: 3},
    12: {1: 2, 2: 2, 3: 1, 4: 15, 5: None, 6: 0},
    40: {1: None, 2: None, 3: 2, 4: None, 5: None, 6: None},
    99: {1: 4, 2: 4, 3: 4, 4: 4, 5: 4, 6: 4},
}


def _names(n):
    # created in a shuffled order; file names sort as 0001.jpg, 0002.jpg, ...
    return [f"{i:04d}.jpg" for i in range(1, n + 1)]


@pytest.fixture
def sysu_root(tmp_path):
    root = tmp_path / "SYSU-MM01"
    for pid, cams in TREE.items():
        for cam, n in cams.items():
            if n is None:
                continue
            folder = root / f"cam{cam}" / f"{pid:04d}"
            folder.mkdir(parents=True)
            names = _names(n)
            random.Random(pid * 10 + cam).shuffle(names)
            for name in names:
                (folder / name).write_bytes(b"")
    (root / "exp").mkdir()
    (root / "exp" / "test_id.txt").write_text("12,3,7,40\n")
    (root / "exp" / "train_id.txt").write_text("99\n")
    return str(root)


def test_test_ids(sysu_root):
    assert sysu_test_ids(sysu_root) == [3, 7, 12, 40]


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_query_list(sysu_root, mode):
    paths, pids, cams = sysu_query(sysu_root, mode)
    # by hand: ids 3, 7, 12, 40 in order; cam3 then cam6; files sorted
    expected = ([("cam3", 3, i) for i in range(1, 5)] + [("cam6", 3, i) for i in range(1, 3)]
                + [("cam6", 7, i) for i in range(1, 4)] + [("cam3", 12, 1)] + [("cam3", 40, 1), ("cam3", 40, 2)])
    assert paths == [os.path.join(sysu_root, c, f"{p:04d}", f"{i:04d}.jpg") for c, p, i in expected]
    np.testing.assert_array_equal(pids, [p for _, p, _ in expected])
    np.testing.assert_array_equal(cams, [int(c[3]) for c, _, _ in expected])
    assert pids.dtype == np.int64 and cams.dtype == np.int64


def _expected_gallery(mode, trial, shot):
    """The spec rule, spelled out with the global random module."""
    cameras = [1, 2, 4, 5] if mode == "all" else [1, 2]
    random.seed(trial)
    out = []
    for pid in [3, 7, 12, 40]:
        for cam in cameras:
            n = TREE[pid][cam]
            if not n:  # folder absent (or empty)
                continue
            files = _names(n)
            if shot == "single":
                picked = [random.choice(files)]
            else:
                picked = random.sample(files, 10) if n >= 10 else files
            out += [(cam, pid, f) for f in picked]
    return out


@pytest.mark.parametrize("shot", ["single", "multi"])
@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("trial", range(10))
def test_gallery_lists(sysu_root, mode, trial, shot):
    state = random.getstate()
    paths, pids, cams = sysu_gallery(sysu_root, mode, trial, shot)
    assert random.getstate() == state  # the global generator is left alone
    expected = _expected_gallery(mode, trial, shot)
    assert paths == [os.path.join(sysu_root, f"cam{c}", f"{p:04d}", f) for c, p, f in expected]
    np.testing.assert_array_equal(pids, [p for _, p, _ in expected])
    np.testing.assert_array_equal(cams, [c for c, _, _ in expected])


def test_gallery_sizes_and_draws_differ(sysu_root):
    # all-search: 3 -> cams 1,2,5; 7 -> cams 1,4,5; 12 -> cams 1,2,4  => 9 single-shot images
    assert len(sysu_gallery(sysu_root, "all", 0)[0]) == 9
    assert len(sysu_gallery(sysu_root, "indoor", 0)[0]) == 5  # 3: cams 1,2; 7: cam 1; 12: cams 1,2
    # multi-shot all: 3: 10+3+1, 7: 5+10+10, 12: 2+2+10
    assert len(sysu_gallery(sysu_root, "all", 0, "multi")[0]) == 53
    draws = {tuple(sysu_gallery(sysu_root, "all", t)[0]) for t in range(10)}
    assert len(draws) > 1


def test_sysu_bad_arguments(sysu_root, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        sysu_query(sysu_root, "outdoor")
    with pytest.raises(ValueError, match="shot"):
        sysu_gallery(sysu_root, "all", 0, "double")
    with pytest.raises(TypeError, match="trial"):
        sysu_gallery(sysu_root, "all", 0.5)
    with pytest.raises(FileNotFoundError, match="test_id.txt"):
        sysu_query(str(tmp_path / "nowhere"))


@pytest.fixture
def regdb_root(tmp_path):
    root = tmp_path / "RegDB"
    (root / "idx").mkdir(parents=True)
    for t in range(1, 11):
        for modality, folder, ext in (("visible", "Visible", "bmp"), ("thermal", "Thermal", "bmp")):
            lines = [f"{folder}/{pid}/{modality[0]}_{t}_{j}.{ext} {pid + t}" for pid in range(3) for j in range(2)]
            (root / "idx" / f"test_{modality}_{t}.txt").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.mark.parametrize("trial", range(1, 11))
def test_regdb_split(regdb_root, trial):
    v2t = regdb_split(regdb_root, trial, "v2t")
    assert v2t.query_paths[0] == os.path.join(regdb_root, f"Visible/0/v_{trial}_0.bmp")
    assert v2t.gallery_paths[-1] == os.path.join(regdb_root, f"Thermal/2/t_{trial}_1.bmp")
    np.testing.assert_array_equal(v2t.query_pids, np.repeat(np.arange(3), 2) + trial)
    assert (v2t.query_camids == 1).all() and (v2t.gallery_camids == 2).all()
    t2v = regdb_split(regdb_root, trial, "t2v")
    assert t2v.query_paths == v2t.gallery_paths and t2v.gallery_paths == v2t.query_paths


def test_regdb_bad_arguments(regdb_root):
    with pytest.raises(ValueError, match="trial"):
        regdb_split(regdb_root, 0)
    with pytest.raises(ValueError, match="direction"):
        regdb_split(regdb_root, 1, "sideways")
    with open(os.path.join(regdb_root, "idx", "test_visible_2.txt"), "a") as fh:
        fh.write("broken-line\n")
    with pytest.raises(ValueError, match="expected"):
        regdb_split(regdb_root, 2)


def test_evaluate_trials_mean_std():
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(10):
        q_pids, g_pids = rng.integers(0, 6, 30), np.arange(12) % 6
        trials.append((rng.standard_normal((30, 12)), q_pids, g_pids, rng.choice([3, 6], 30),
                       rng.choice([1, 2, 4, 5], 12)))
    summary = evaluate_trials(trials, protocol="sysu", max_rank=10, label="sysu all")
    singles = [evaluate(*t, protocol="sysu", max_rank=10) for t in trials]
    maps = np.array([r.mAP for r in singles])
    assert summary.mean["mAP"] == pytest.approx(maps.mean())
    assert summary.std["mAP"] == pytest.approx(maps.std())
    assert summary.mean["rank1"] == pytest.approx(np.mean([r.rank1 for r in singles]))
    assert np.isnan(summary.mean["rank20"])  # beyond max_rank
    np.testing.assert_allclose(summary.mean_cmc, np.mean([r.cmc_unique for r in singles], axis=0))
    dict_trials = [dict(distmat=t[0], q_pids=t[1], g_pids=t[2]) for t in trials]
    regdb = evaluate_trials(dict_trials, protocol="regdb")
    assert len(regdb.results) == 10
    again = summarize_trials(singles).mean
    np.testing.assert_array_equal(list(again.values()), list(summary.mean.values()))
    with pytest.raises(ValueError):
        summarize_trials([])
    with pytest.raises(TypeError):
        evaluate_trials([object()])
