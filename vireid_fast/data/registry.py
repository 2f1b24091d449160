"""Dataset registry: ``@register_dataset("name")`` on a :class:`VIReIDDataset` subclass makes it available by name.

A reader fills per-modality lists of :class:`ImageRecord` in :meth:`VIReIDDataset.load`; the base class then checks
that both training modalities are non-empty. A minimal custom dataset::

    @register_dataset("my_lab")
    class MyLab(VIReIDDataset):
        def load(self):
            for modality, folder, camid in (("visible", "rgb", 1), ("infrared", "ir", 2)):
                for path in sorted(glob.glob(os.path.join(self.root, folder, "*", "*.png"))):
                    pid = int(os.path.basename(os.path.dirname(path)))
                    self.add_train(path, pid, camid, modality)

    data = create_dataset("my_lab", "/data/my_lab")
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .records import INFRARED, MODALITIES, VISIBLE, DatasetError, ImageRecord, count_by_modality

_REGISTRY: dict[str, type[VIReIDDataset]] = {}


class VIReIDDataset:
    """Base class of every reader.

    After construction: ``train_visible`` / ``train_infrared``: training images per modality; ``query`` /
    ``gallery``: test images when the layout defines them (else empty, see the reader's docs); ``root``: the folder.
    Subclasses implement :meth:`load` (and take extra options in their own ``__init__``, set before calling
    ``super().__init__(root)``); errors are collected into one :class:`DatasetError`.
    """

    name = "dataset"
    #: Evaluation protocol (:func:`vireid_fast.eval.evaluate`): ``"sysu"`` drops camera-2 gallery items for camera-3
    #: queries (SYSU-MM01's rule); ``"regdb"`` drops nothing, the safe choice for a custom dataset.
    protocol = "regdb"
    #: True for the SYSU-MM01 folder layout: query and gallery are sampled from ``exp/test_id.txt`` per trial by
    #: :func:`vireid_fast.eval.sysu_gallery` instead of being listed by the reader.
    gallery_trials = False

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.train_visible: list[ImageRecord] = []
        self.train_infrared: list[ImageRecord] = []
        self.query: list[ImageRecord] = []
        self.gallery: list[ImageRecord] = []
        if not os.path.isdir(self.root):
            raise DatasetError(self.name, self.root, [f"folder {self.root} does not exist (or is not a folder); pass "
                                                      "the dataset folder (--data-root DIR / data.root)"])
        self.load()
        self._check()

    def load(self) -> None:
        """Fill ``train_visible``, ``train_infrared`` (and optionally ``query``, ``gallery``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def add_train(self, path: str, pid: int, camid: int, modality: str) -> None:
        """Append one training image (``modality``: ``"visible"`` or ``"infrared"``)."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'visible' or 'infrared', got {modality!r} (for {path})")
        record = ImageRecord(os.path.join(self.root, path), int(pid), int(camid), modality)
        (self.train_visible if modality == VISIBLE else self.train_infrared).append(record)

    def _check(self) -> None:
        problems = []
        for modality, records in ((VISIBLE, self.train_visible), (INFRARED, self.train_infrared)):
            if not records:
                problems.append(f"no {modality} training images were found")
            wrong = sorted({r.modality for r in records if r.modality != modality})
            if wrong:
                problems.append(f"train_{modality} holds records of modality {', '.join(wrong)}")
        if problems:
            raise DatasetError(self.name, self.root, problems)

    @property
    def train(self) -> list[ImageRecord]:
        """Visible then infrared training records."""
        return self.train_visible + self.train_infrared

    def summary(self) -> dict[str, int]:
        """Counts: training ids (union over modalities) and images per modality; query/gallery sizes."""
        return {
            "train_ids": len({r.pid for r in self.train}),
            "train_visible_images": len(self.train_visible),
            "train_infrared_images": len(self.train_infrared),
            "query_images": len(self.query),
            "gallery_images": len(self.gallery),
            **{f"query_{k}": v for k, v in count_by_modality(self.query).items() if v},
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        return f"{type(self).__name__}({self.root!r}: {counts})"


def register_dataset(name: str) -> Callable[[type[VIReIDDataset]], type[VIReIDDataset]]:
    """Class decorator registering a :class:`VIReIDDataset` subclass under ``name`` (unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def decorate(cls: type[VIReIDDataset]) -> type[VIReIDDataset]:
        if not (isinstance(cls, type) and issubclass(cls, VIReIDDataset)):
            raise TypeError(f"@register_dataset({name!r}) needs a subclass of VIReIDDataset, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"dataset name {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                             f"choose another name or unregister_dataset({name!r}) first")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_dataset(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_class(name: str) -> type[VIReIDDataset]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets()) or '(none)'}. "
                         "Register yours with @register_dataset(name)") from None


def create_dataset(name: str, root: str, **options) -> VIReIDDataset:
    """Open the dataset ``name`` at ``root`` (options go to the reader, e.g. ``trial=1`` for RegDB)."""
    return get_dataset_class(name)(root, **options)
