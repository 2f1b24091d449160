"""Tiny fake dataset trees in the exact on-disk layouts (real, decodable images of a few pixels)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_image(path: str, value: int = 128, size: tuple[int, int] = (8, 4)) -> str:
    """An (H, W) = size RGB image whose pixels encode ``value`` (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = size
    array = np.full((h, w, 3), value % 256, np.uint8)
    array[0, 0] = (value * 7 % 256, value * 13 % 256, value * 29 % 256)
    Image.fromarray(array).save(path)
    return path


def make_sysu(root: str, train=(1, 2, 3), val=(4,), test=(5, 6), counts=None) -> dict:
    """SYSU-MM01 original tree. ``counts[(pid, cam)]`` images per id and camera (default 2, cam1 of id 2 absent).
    Returns the expected image counts."""
    counts = dict(counts or {})
    expected = {"visible": 0, "infrared": 0, "test_visible": 0, "test_infrared": 0}
    os.makedirs(os.path.join(root, "exp"), exist_ok=True)
    for name, ids in (("train_id.txt", train), ("val_id.txt", val), ("test_id.txt", test)):
        with open(os.path.join(root, "exp", name), "w") as f:
            f.write(",".join(str(i) for i in ids))
    for pid in list(train) + list(val) + list(test):
        for cam in range(1, 7):
            n = counts.get((pid, cam), 0 if (pid == 2 and cam == 1) else 2 + (pid + cam) % 2)
            for k in range(1, n + 1):
                write_image(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k:04d}.jpg"), pid * 10 + cam)
            modality = "infrared" if cam in (3, 6) else "visible"
            expected[("test_" if pid in test else "") + modality] += n
    return expected


def make_prepared(root: str, trial: int | None = None, ext: str = ".jpg") -> dict:
    """Market-style prepared tree (SYSU when trial is None, RegDB otherwise). Returns expected counts."""
    expected = {}
    for modality, folder, cams in (("visible", "rgb_modify", (1, 2)), ("infrared", "ir_modify", (3, 6))):
        for split, pids in (("bounding_box_train", (1, 2, 3)), ("bounding_box_test", (7, 8)), ("query", (7, 8))):
            base = os.path.join(root, folder, *([str(trial)] if trial is not None else []), split)
            n = 0
            for pid in pids:
                for i, cam in enumerate(cams if trial is None else (1,)):
                    write_image(os.path.join(base, f"{pid:04d}_c{cam}_{i:04d}{ext}"), pid)
                    n += 1
            write_image(os.path.join(base, f"-1_c{cams[0]}_9999{ext}"), 0)  # junk: skipped
            expected[modality, split] = n
    return expected


def make_regdb(root: str, trial: int = 1, train_ids=(0, 1, 2), test_ids=(3, 4, 5), per_id: int = 2) -> None:
    """RegDB original tree for one trial: Visible/ and Thermal/ bmp files plus the four idx lists."""
    os.makedirs(os.path.join(root, "idx"), exist_ok=True)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for label in ids:
                for k in range(per_id):
                    relative = f"{folder}/{label + 1}/{modality}_{label}_{k}.bmp"
                    write_image(os.path.join(root, relative), label)
                    lines.append(f"{relative} {label}")
            with open(os.path.join(root, "idx", f"{split}_{modality}_{trial}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
