"""SYSU-MM01 in its original layout (what the evaluation protocol and SALCR/MULT read).

::

    SYSU-MM01/cam{1..6}/{pid:04d}/{nnnn}.jpg
    SYSU-MM01/exp/{train,val,test}_id.txt      one comma-separated line of integer ids each

RGB cameras 1, 2, 4, 5; IR cameras 3, 6. Training set = train ∪ val ids (395 ids: 22,258 RGB and 11,909 IR images on
the real dataset). Test ids: 96. The query/gallery sampling of the evaluation protocol lives in
``vireid_fast.eval`` (``sysu_query`` / ``sysu_gallery``); this reader exposes the test images per camera
(``test_by_camera``) in protocol order (ids sorted, files sorted) for it. The synthetic dataset
(:mod:`vireid_fast.data.synthetic`) is written in this layout.
"""

from __future__ import annotations

import os

from .records import INFRARED, VISIBLE, DatasetError, ImageRecord, image_files, list_some, read_text
from .registry import VIReIDDataset, register_dataset

VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
ID_FILES = ("train_id.txt", "val_id.txt", "test_id.txt")


def camera_modality(camid: int) -> str:
    return INFRARED if camid in INFRARED_CAMERAS else VISIBLE


def read_id_file(path: str, label: str, problems: list[str]) -> list[int]:
    """Parse one ``exp/*_id.txt`` (comma-separated integers, whitespace and a trailing comma tolerated)."""
    if not os.path.isfile(path):
        problems.append(f"missing {label} (one comma-separated line of integer ids)")
        return []
    text = read_text(path, label, problems)
    if text is None:
        return []
    ids, bad = [], []
    for position, token in enumerate(text.replace("\n", ",").split(","), start=1):
        token = token.strip()
        if not token:
            continue
        try:
            ids.append(int(token))
        except ValueError:
            bad.append(f"{token!r} (item {position})")
    if bad:
        problems.append(f"{label}: not integer ids: {list_some(bad)}")
    elif not ids:
        problems.append(f"{label} lists no ids")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.append(f"{label} lists ids more than once: {list_some(str(i) for i in duplicates)}")
    return ids


@register_dataset("sysu_mm01")
class SYSUMM01(VIReIDDataset):
    """SYSU-MM01, original layout. After opening:

    ``train_visible`` / ``train_infrared``: images of train ∪ val ids (ids sorted, cameras in order, files sorted);
    ``train_ids``, ``val_ids``, ``test_ids``: sorted id lists from ``exp/``;
    ``test_by_camera``: ``{camid: [ImageRecord, ...]}`` for the test ids (all six cameras, protocol order);
    ``query`` / ``gallery`` stay empty: build them with the evaluation protocol (``vireid_fast.eval``).
    """

    protocol = "sysu"
    gallery_trials = True

    def load(self) -> None:
        problems: list[str] = []
        exp = os.path.join(self.root, "exp")
        lists = {name: read_id_file(os.path.join(exp, name), f"exp/{name}", problems) for name in ID_FILES}
        self.train_ids = sorted(lists["train_id.txt"])
        self.val_ids = sorted(lists["val_id.txt"])
        self.test_ids = sorted(lists["test_id.txt"])
        training = sorted(set(self.train_ids) | set(self.val_ids))
        overlap = sorted(set(training) & set(self.test_ids))
        if overlap:
            problems.append(f"ids in both training (train/val) and exp/test_id.txt: {list_some(map(str, overlap))}")

        present: dict[int, set[str]] = {}  # camid -> id folder names with at least one image
        for camid in VISIBLE_CAMERAS + INFRARED_CAMERAS:
            folder = os.path.join(self.root, f"cam{camid}")
            if not os.path.isdir(folder):
                problems.append(f"missing camera folder cam{camid} ({camera_modality(camid)})")
                continue
            present[camid] = {d for d in os.listdir(folder)
                              if os.path.isdir(os.path.join(folder, d)) and image_files(os.path.join(folder, d))}
            if not present[camid]:
                problems.append(f"camera folder cam{camid} has no images (expected cam{camid}/<pid:04d>/<nnnn>.jpg)")

        for label, ids in (("train/val", training), ("test", self.test_ids)):
            missing = [pid for pid in ids if not any(f"{pid:04d}" in names for names in present.values())]
            if missing and present:
                problems.append(f"{label} ids with no images in any camera (looked for cam1..cam6/<pid:04d>/): "
                                f"{list_some(map(str, missing))}")
        if problems:
            raise DatasetError(self.name, self.root, problems)

        def records(pids: list[int], camid: int) -> list[ImageRecord]:
            out = []
            for pid in pids:
                folder = os.path.join(self.root, f"cam{camid}", f"{pid:04d}")
                if f"{pid:04d}" in present.get(camid, ()):
                    out += [ImageRecord(os.path.join(folder, n), pid, camid, camera_modality(camid))
                            for n in image_files(folder)]
            return out

        for pid in training:  # ids sorted, then cameras in order, as the community readers list them
            for camid in VISIBLE_CAMERAS:
                self.train_visible += records([pid], camid)
            for camid in INFRARED_CAMERAS:
                self.train_infrared += records([pid], camid)
        self.test_by_camera = {camid: records(self.test_ids, camid) for camid in VISIBLE_CAMERAS + INFRARED_CAMERAS}

    def summary(self) -> dict[str, int]:
        out = super().summary()
        out["test_ids"] = len(self.test_ids)
        out["test_visible_images"] = sum(len(self.test_by_camera[c]) for c in VISIBLE_CAMERAS)
        out["test_infrared_images"] = sum(len(self.test_by_camera[c]) for c in INFRARED_CAMERAS)
        return out


@register_dataset("synthetic")
class SyntheticVIReID(SYSUMM01):
    """The synthetic dataset (:mod:`vireid_fast.data.synthetic`) at ``root``, read as SYSU-MM01; generated there first
    when ``root`` is missing or empty (``ids``, ``seed``, ``size``, ``image_size``, ``workers``: see ``generate``)."""

    def __init__(self, root: str, ids: int | None = None, seed: int = 0, size: str = "small",
                 image_size: tuple[int, int] = (128, 64), workers: int = 0):
        root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.isdir(root) or not os.listdir(root):
            from .synthetic import generate  # imported here so `python -m vireid_fast.data.synthetic` runs cleanly

            generate(root, ids=ids, seed=seed, size=size, image_size=image_size, workers=workers)
        super().__init__(root)
