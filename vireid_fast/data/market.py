"""The "prepared" Market-style layouts the cluster-contrast family trains from (ADCA, PGM, PCLHD, HIL, GUR, SDCL).

::

    sysu/{rgb_modify,ir_modify}/{bounding_box_train,bounding_box_test,query}/{pid}_c{cam}_{img}.jpg
    regdb/{rgb_modify,ir_modify}/{trial}/{bounding_box_train,bounding_box_test,query}/{label}_c1_{basename}.bmp

File names are parsed with the pattern ``([-\\d]+)_c(\\d)`` (camera ids 1-based in the name); images with pid -1
(junk) are skipped, as the community readers do. ``rgb_modify`` holds the visible images, ``ir_modify`` the infrared.
"""

from __future__ import annotations

import os
import re

from .records import INFRARED, VISIBLE, DatasetError, ImageRecord, image_files, list_some
from .registry import VIReIDDataset, register_dataset

NAME_PATTERN = re.compile(r"([-\d]+)_c(\d)")
MODALITY_FOLDERS = {VISIBLE: "rgb_modify", INFRARED: "ir_modify"}
SPLITS = ("bounding_box_train", "bounding_box_test", "query")


def parse_name(name: str) -> tuple[int, int] | None:
    """``(pid, camid)`` from a Market-style file name, or None when it does not match."""
    match = NAME_PATTERN.search(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


class PreparedVIReID(VIReIDDataset):
    """A prepared visible-infrared tree. ``splits[(modality, split)]`` holds every split folder found;
    ``train_visible`` / ``train_infrared`` come from ``bounding_box_train``; ``query`` = ``query`` of
    ``query_modality``, ``gallery`` = ``bounding_box_test`` of the other modality."""

    def __init__(self, root: str, query_modality: str = INFRARED, trial: int | None = None):
        if query_modality not in (VISIBLE, INFRARED):
            raise ValueError(f"query_modality must be 'visible' or 'infrared', got {query_modality!r}")
        self.query_modality = query_modality
        self.trial = trial
        super().__init__(root)

    def _folder(self, modality: str, split: str) -> str:
        parts = [MODALITY_FOLDERS[modality]] + ([str(self.trial)] if self.trial is not None else []) + [split]
        return os.path.join(*parts)

    def load(self) -> None:
        gallery_modality = VISIBLE if self.query_modality == INFRARED else INFRARED
        required = {(VISIBLE, "bounding_box_train"), (INFRARED, "bounding_box_train"),
                    (self.query_modality, "query"), (gallery_modality, "bounding_box_test")}
        problems: list[str] = []
        self.splits: dict[tuple[str, str], list[ImageRecord]] = {}
        for modality in (VISIBLE, INFRARED):
            for split in SPLITS:
                relative = self._folder(modality, split)
                folder = os.path.join(self.root, relative)
                if not os.path.isdir(folder):
                    if (modality, split) in required:
                        problems.append(f"missing folder {relative}")
                    continue
                names = image_files(folder)
                if not names:
                    problems.append(f"{relative} has no images")
                    continue
                records, unparsed = [], []
                for name in names:
                    parsed = parse_name(name)
                    if parsed is None:
                        unparsed.append(name)
                    elif parsed[0] != -1:
                        records.append(ImageRecord(os.path.join(folder, name), parsed[0], parsed[1], modality))
                if unparsed:
                    problems.append(f"{relative}: {len(unparsed)} file name(s) do not match '{{pid}}_c{{cam}}_...' "
                                    f"(pattern {NAME_PATTERN.pattern}): {list_some(unparsed)}")
                self.splits[(modality, split)] = records
        if problems:
            raise DatasetError(self.name, self.root, problems)
        self.train_visible = self.splits[(VISIBLE, "bounding_box_train")]
        self.train_infrared = self.splits[(INFRARED, "bounding_box_train")]
        self.query = self.splits[(self.query_modality, "query")]
        self.gallery = self.splits[(gallery_modality, "bounding_box_test")]


@register_dataset("sysu_mm01_prepared")
class PreparedSYSUMM01(PreparedVIReID):
    """``sysu/{rgb_modify,ir_modify}/...``; query = infrared ``query`` (default), gallery = visible test images."""

    protocol = "sysu"

    def __init__(self, root: str, query_modality: str = INFRARED):
        super().__init__(root, query_modality=query_modality)


@register_dataset("regdb_prepared")
class PreparedRegDB(PreparedVIReID):
    """``regdb/{rgb_modify,ir_modify}/{trial}/...`` for trial 1..10; query = visible (default, visible→thermal)."""

    def __init__(self, root: str, trial: int = 1, query_modality: str = VISIBLE):
        if not isinstance(trial, int) or not 1 <= trial <= 10:
            raise ValueError(f"trial must be an integer in 1..10, got {trial!r}")
        super().__init__(root, query_modality=query_modality, trial=trial)
