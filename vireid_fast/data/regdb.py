"""RegDB in its original layout.

::

    RegDB/idx/{train,test}_{visible,thermal}_{trial}.txt    lines "relative/path label" (trial 1..10)
    RegDB/Visible/...   RegDB/Thermal/...                   (bmp)

412 identities × (10 visible + 10 thermal); each trial trains on 206 ids (2,060 images per modality) and tests on
the other 206. Visible images get camera 1, thermal images camera 2 (as the evaluation code assumes). ``query`` is
the test list of ``query_modality`` (default visible, the visible→thermal direction), ``gallery`` the other.
"""

from __future__ import annotations

import os

from .records import INFRARED, VISIBLE, DatasetError, ImageRecord, inside_root, list_some, read_text
from .registry import VIReIDDataset, register_dataset

CAMERA = {VISIBLE: 1, INFRARED: 2}
LIST_NAME = {VISIBLE: "visible", INFRARED: "thermal"}


def read_idx_file(root: str, relative: str, modality: str, problems: list[str]) -> list[ImageRecord]:
    """Parse one idx list; every malformed line, path outside ``root`` and missing image becomes a problem naming
    file and line."""
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        problems.append(f"missing {relative} (lines 'relative/path label')")
        return []
    text = read_text(path, relative, problems)
    if text is None:
        return []
    records, malformed, outside, missing = [], [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            if len(fields) != 2 or not fields[0]:
                raise ValueError
            label = int(fields[1])
        except ValueError:
            malformed.append(f"line {number}: {line!r}")
            continue
        image = inside_root(root, fields[0])
        if image is None:
            outside.append(f"line {number}: {fields[0]!r}")
            continue
        if not os.path.isfile(image):
            missing.append(fields[0])
        records.append(ImageRecord(image, label, CAMERA[modality], modality))
    if malformed:
        problems.append(f"{relative}: {len(malformed)} malformed line(s), expected 'relative/path label': "
                        f"{list_some(malformed)}")
    if outside:
        problems.append(f"{relative}: {len(outside)} path(s) outside the dataset root {root} (absolute or '..' "
                        f"paths are refused; list images relative to the root): {list_some(outside)}")
    if missing:
        problems.append(f"{relative}: {len(missing)} listed image(s) not found under {root}: {list_some(missing)}")
    if not records and not malformed and not outside:
        problems.append(f"{relative} lists no images")
    return records


@register_dataset("regdb")
class RegDB(VIReIDDataset):
    """RegDB original layout, one trial (1..10). ``test_visible`` / ``test_thermal`` hold the test lists."""

    def __init__(self, root: str, trial: int = 1, query_modality: str = VISIBLE):
        if not isinstance(trial, int) or not 1 <= trial <= 10:
            raise ValueError(f"trial must be an integer in 1..10, got {trial!r}")
        if query_modality not in (VISIBLE, INFRARED):
            raise ValueError(f"query_modality must be 'visible' or 'infrared', got {query_modality!r}")
        self.trial = trial
        self.query_modality = query_modality
        super().__init__(root)

    def load(self) -> None:
        problems: list[str] = []
        lists = {}
        for split in ("train", "test"):
            for modality in (VISIBLE, INFRARED):
                relative = os.path.join("idx", f"{split}_{LIST_NAME[modality]}_{self.trial}.txt")
                lists[split, modality] = read_idx_file(self.root, relative, modality, problems)
        if problems:
            raise DatasetError(self.name, self.root, problems)
        self.train_visible = lists["train", VISIBLE]
        self.train_infrared = lists["train", INFRARED]
        self.test_visible = lists["test", VISIBLE]
        self.test_thermal = lists["test", INFRARED]
        self.query = self.test_visible if self.query_modality == VISIBLE else self.test_thermal
        self.gallery = self.test_thermal if self.query_modality == VISIBLE else self.test_visible
