"""Image records and the validation error every reader raises.

A reader turns a dataset folder into lists of :class:`ImageRecord` (one per image file) per modality and split. It
collects *every* problem it finds before raising one :class:`DatasetError` that lists them, so a user fixes a broken
tree in one pass instead of one KeyError at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..modality import INFRARED, MODALITIES, VISIBLE, Modality  # noqa: F401  (re-exported: readers import them here)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# How many offending items an error message spells out before summarising the rest as a count.
MAX_LISTED = 10


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk.

    path: absolute or root-relative file path; pid: identity as written in the dataset (int, -1 = junk/unlabelled);
    camid: camera id as written in the dataset (1-based for SYSU-MM01; RegDB: 1 = visible, 2 = thermal);
    modality: :class:`~vireid_fast.modality.Modality` (``"visible"``/``"infrared"`` are accepted and converted).
    """

    path: str
    pid: int
    camid: int
    modality: Modality

    def __post_init__(self):
        object.__setattr__(self, "modality", Modality.parse(self.modality))


class DatasetError(ValueError):
    """A dataset folder is not what its reader expects. ``problems`` lists each issue found (with its location)."""

    def __init__(self, dataset: str, root: str, problems: Sequence[str]):
        self.dataset = dataset
        self.root = root
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{dataset} at {root}: {count} problem{'s' if count != 1 else ''} found:\n{lines}")


def list_some(items: Iterable[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` or ``a, b, ... (+5 more)``: keeps error messages readable for big trees."""
    items = list(items)
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... (+{len(items) - limit} more)"


def read_text(path: str, label: str, problems: list[str]) -> str | None:
    """The UTF-8 text of a list file (a byte-order mark tolerated, newlines normalised to ``\\n``), or None after
    appending a problem naming ``label`` (the root-relative name) when it cannot be read or is not text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        problems.append(f"{label}: cannot be read ({error.strerror or error}); check its permissions")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        problems.append(f"{label}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); it "
                        "must be a plain-text list: is it a binary or mis-named file?")
        return None
    if "\0" in text:
        problems.append(f"{label}: contains NUL bytes (offset {text.index(chr(0))}); it must be a plain-text list: "
                        "is it a binary or mis-named file?")
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def inside_root(root: str, entry: str) -> str | None:
    """``root/entry`` normalised, or None when ``entry`` (absolute or with ``..``) points outside ``root``.

    Lexical: symbolic links inside the root are followed later as usual (datasets are often assembled from links).
    """
    path = os.path.normpath(os.path.join(root, entry))
    try:
        return path if os.path.commonpath([os.path.normpath(root), path]) == os.path.normpath(root) else None
    except ValueError:  # different drives on Windows
        return None


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_files(folder: str) -> list[str]:
    """Sorted image file names (not paths) directly inside ``folder``."""
    return sorted(n for n in os.listdir(folder) if is_image_file(n) and os.path.isfile(os.path.join(folder, n)))


def count_by_modality(records: Iterable[ImageRecord]) -> dict[str, int]:
    counts = dict.fromkeys(MODALITIES, 0)
    for r in records:
        counts[r.modality] += 1
    return counts
