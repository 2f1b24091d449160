"""RegDB test protocol: the 10 trial splits from ``root/idx/test_{visible,thermal}_{t}.txt`` (t = 1..10).

Each idx line is ``relative/path label`` (split on the first space); paths are joined to ``root``. Directions:
``"v2t"`` (query = visible test list, gallery = thermal test list) and ``"t2v"`` (the reverse). Cameras follow the
community evaluation (query camera 1, gallery camera 2); RegDB removes nothing.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

__all__ = ["DIRECTIONS", "RegDBSplit", "regdb_list", "regdb_split"]

DIRECTIONS = ("v2t", "t2v")
TRIALS = range(1, 11)


class RegDBSplit(NamedTuple):
    """One trial and direction: lists of paths and (N,) int64 pids / camids for query and gallery."""

    query_paths: list[str]
    query_pids: np.ndarray
    query_camids: np.ndarray
    gallery_paths: list[str]
    gallery_pids: np.ndarray
    gallery_camids: np.ndarray


def regdb_list(root: str, trial: int, modality: str, split: str = "test") -> tuple[list[str], np.ndarray]:
    """Read ``root/idx/{split}_{modality}_{trial}.txt`` -> ``(paths, labels)`` in file order."""
    if modality not in ("visible", "thermal"):
        raise ValueError(f"modality must be 'visible' or 'thermal', got {modality!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial not in TRIALS:
        raise ValueError(f"trial must be an int in 1..10 (the idx file number), got {trial!r}")
    path = os.path.join(root, "idx", f"{split}_{modality}_{int(trial)}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; root must be the RegDB folder (holding idx/, Visible/, Thermal/)")
    paths, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh.read().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(" ")
            try:
                labels.append(int(parts[1]))
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}") from None
            paths.append(os.path.join(root, parts[0]))
    return paths, np.asarray(labels, dtype=np.int64)


def regdb_split(root: str, trial: int, direction: str = "v2t") -> RegDBSplit:
    """Query and gallery lists of one RegDB trial (1..10) and direction (``"v2t"`` or ``"t2v"``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    visible = regdb_list(root, trial, "visible")
    thermal = regdb_list(root, trial, "thermal")
    (qp, ql), (gp, gl) = (visible, thermal) if direction == "v2t" else (thermal, visible)
    return RegDBSplit(qp, ql, np.ones(len(ql), dtype=np.int64), gp, gl, np.full(len(gl), 2, dtype=np.int64))
