"""SYSU-MM01 test protocol: the query list and the seeded gallery sampling of the community evaluation code.

Layout: ``root/cam{1..6}/{pid:04d}/*.jpg`` and ``root/exp/test_id.txt`` (one comma-separated line of ids). RGB cameras
1, 2, 4, 5 (indoor: 1, 2), IR cameras 3, 6.

* Query (both modes): every image of every test id under cam3 then cam6, ids in sorted order, files sorted by name.
* Gallery, single shot, trial ``t``: ``random.seed(t)`` once, then for each id (sorted) and each RGB camera of the mode
  (in the order above) whose folder exists, ``random.choice(sorted(files))``.
* Gallery, multi shot (SALCR's multi-shot table): the same loop, but ``random.sample(sorted(files), 10)`` (kept in
  the order drawn) when the folder holds at least 10 files, else all its files in sorted order (no random draw).

Empty camera folders are skipped without drawing (the community code would stop with an IndexError there). Only regular
files count as images. ``camid`` and ``pid`` come from the camera and id folder names.
"""

from __future__ import annotations

import os
import random

import numpy as np

__all__ = ["IR_CAMERAS", "MODES", "RGB_CAMERAS", "sysu_gallery", "sysu_query", "sysu_test_ids"]

IR_CAMERAS = ("cam3", "cam6")
RGB_CAMERAS = {"all": ("cam1", "cam2", "cam4", "cam5"), "indoor": ("cam1", "cam2")}
MODES = tuple(RGB_CAMERAS)
MULTI_SHOT = 10


def sysu_test_ids(root: str) -> list[int]:
    """The test identities from ``root/exp/test_id.txt``, sorted."""
    path = os.path.join(root, "exp", "test_id.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; root must be the SYSU-MM01 folder (holding cam1..cam6 and exp/)")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    tokens = [t for t in text.replace(",", " ").split() if t]
    try:
        ids = [int(t) for t in tokens]
    except ValueError as exc:
        raise ValueError(f"{path} must hold comma-separated integer ids: {exc}") from None
    if not ids:
        raise ValueError(f"{path} holds no ids")
    return sorted(ids)


def _files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _as_lists(paths: list[str], pids: list[int], cams: list[int]):
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def sysu_query(root: str, mode: str = "all") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Query images (IR cameras 3 and 6; the same for both modes).

    Returns:
        ``(paths, pids, camids)``: list of N paths, (N,) int64 identities, (N,) int64 cameras, in the community order.
    """
    _check_mode(mode)
    paths, pids, cams = [], [], []
    for pid in sysu_test_ids(root):
        for cam in IR_CAMERAS:
            folder = os.path.join(root, cam, f"{pid:04d}")
            if os.path.isdir(folder):
                for name in _files(folder):
                    paths.append(os.path.join(folder, name))
                    pids.append(pid)
                    cams.append(int(cam[3:]))
    return _as_lists(paths, pids, cams)


def sysu_gallery(root: str, mode: str = "all", trial: int = 0,
                 shot: str = "single") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Gallery images of one trial, sampled with ``random.seed(trial)`` exactly as the community code.

    Args:
        root: the SYSU-MM01 folder. mode: ``"all"`` or ``"indoor"``. trial: the seed (0..9 in papers).
        shot: ``"single"`` (one image per id and camera) or ``"multi"`` (10 per id and camera, see module doc).
    Returns:
        ``(paths, pids, camids)`` as :func:`sysu_query`.
    """
    _check_mode(mode)
    if shot not in ("single", "multi"):
        raise ValueError(f"shot must be 'single' or 'multi', got {shot!r}")
    if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)):
        raise TypeError(f"trial must be an int (the random seed), got {type(trial).__name__}")
    ids = sysu_test_ids(root)
    rng = random.Random()  # the same stream as random.seed(trial) without touching the global generator
    rng.seed(int(trial))
    paths, pids, cams = [], [], []
    for pid in ids:
        for cam in RGB_CAMERAS[mode]:
            folder = os.path.join(root, cam, f"{pid:04d}")
            if not os.path.isdir(folder):
                continue
            files = _files(folder)
            if not files:
                continue
            if shot == "single":
                chosen = [rng.choice(files)]
            elif len(files) >= MULTI_SHOT:
                chosen = rng.sample(files, MULTI_SHOT)
            else:
                chosen = files
            for name in chosen:
                paths.append(os.path.join(folder, name))
                pids.append(pid)
                cams.append(int(cam[3:]))
    return _as_lists(paths, pids, cams)
