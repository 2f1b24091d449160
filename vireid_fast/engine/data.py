"""Opening the configured dataset (generating the synthetic one once into a cache folder) and its test protocol."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from ..data import INFRARED, VISIBLE, DatasetError, ImageRecord, create_dataset, find_bad_images, get_dataset_class
from ..data.records import list_some


def cache_dir() -> str:
    """``$VIREID_CACHE`` or ``$XDG_CACHE_HOME/vireid_fast`` or ``~/.cache/vireid_fast``."""
    if os.environ.get("VIREID_CACHE"):
        return os.environ["VIREID_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vireid_fast")


def generator_fingerprint() -> str:
    """Short hash of the generator's source: a changed generator gets a new cache folder, never stale images."""
    from ..data import synthetic

    with open(synthetic.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:10]


def synthetic_root(size: str, ids: int, seed: int) -> str:
    return os.path.join(cache_dir(), f"synthetic-{size}-ids{ids or 'preset'}-seed{seed}-{generator_fingerprint()}")


def ensure_synthetic(root: str, size: str, ids: int, seed: int, log=print) -> str:
    """Generate the synthetic dataset at ``root`` unless it is already complete there (written to a temporary
    folder and renamed, so an interrupted generation never leaves a partial dataset under the real name)."""
    if os.path.isfile(os.path.join(root, "synthetic.json")):
        return root
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists but holds no complete synthetic dataset (no synthetic.json); remove "
                              "it or choose another data.root")
    from ..data.synthetic import generate

    tmp = f"{root}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"generating the synthetic dataset ({size}, seed {seed}) into {root} ...")
    summary = generate(tmp, ids=ids or None, seed=seed, size=size)
    if os.path.isdir(root):
        os.rmdir(root)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)
    log(f"  {summary['images']} images of {summary['ids']} identities in {summary['seconds']:.1f} s")
    return root


def resolve_root(config, data_root: str | None, log=print) -> str:
    """The dataset folder (``data_root`` or ``data.root``; the synthetic set is generated when missing).

    Raises ConfigError for an unknown ``data.dataset`` or an empty root, DatasetError for a missing folder."""
    from ..config import ConfigError

    data = config.data
    if data.dataset != "synthetic":
        try:
            get_dataset_class(data.dataset)
        except ValueError as error:
            raise ConfigError(f"data.dataset: {error}") from None
    root = data_root or data.root
    if data.dataset == "synthetic":
        root = root or synthetic_root(data.synthetic_size, data.synthetic_ids, data.synthetic_seed)
        return ensure_synthetic(os.path.abspath(os.path.expanduser(root)), data.synthetic_size, data.synthetic_ids,
                                data.synthetic_seed, log)
    if not root:
        raise ConfigError(f"data.root: is empty; pass --data-root DIR (the {data.dataset} folder) or set data.root")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(data.dataset, root, [f"folder {root} does not exist (or is not a folder); pass "
                                                "--data-root DIR or set data.root to the dataset folder"])
    return root


def open_dataset(config, root: str):
    name = config.data.dataset
    options = {"trial": config.data.trial} if name in ("regdb", "regdb_prepared") else {}
    if name == "synthetic":
        name = "sysu_mm01"  # the synthetic set is written in the SYSU-MM01 layout (already generated here)
    return create_dataset(name, root, **options)


@dataclass
class TestSet:
    """Query and gallery images of one evaluation (gallery trials share the gallery image list)."""

    protocol: str
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    gallery_trials: list[np.ndarray]  # per trial: indices into ``gallery``
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) dropped as unreadable

    def without_bad_images(self, max_pixels: int, dataset: str, root: str) -> TestSet:
        """This test set without the images that cannot be decoded (``skipped`` lists them); the gallery trials are
        renumbered. Raises DatasetError when nothing is left to evaluate."""
        bad = find_bad_images([r.path for r in self.query + self.gallery], max_pixels)
        if not bad:
            return self
        paths = {p for p, _ in bad}
        keep = np.array([r.path not in paths for r in self.gallery], dtype=bool)
        renumber = np.full(len(self.gallery), -1, dtype=np.int64)
        renumber[keep] = np.arange(int(keep.sum()))
        trials = [renumber[t][renumber[t] >= 0] for t in self.gallery_trials]
        query = [r for r in self.query if r.path not in paths]
        if not query or any(len(t) == 0 for t in trials):
            raise DatasetError(dataset, root, [f"no readable query image or no readable gallery image in a trial "
                                               f"({len(bad)} unreadable: {list_some(p for p, _ in bad)}); fix the "
                                               "image files"])
        return TestSet(self.protocol, query, [r for r, k in zip(self.gallery, keep, strict=True) if k], trials,
                       self.skipped + bad)


def _records(paths, pids, camids, modality) -> list[ImageRecord]:
    return [ImageRecord(p, int(i), int(c), modality) for p, i, c in zip(paths, pids, camids, strict=True)]


def build_test_set(config, dataset, root: str) -> TestSet:
    """SYSU-MM01 layout (incl. synthetic): infrared query, visible gallery sampled per trial (``eval.trials``, seeds
    0..trials-1, ``eval.mode``); RegDB and prepared layouts: the reader's query and gallery."""
    if dataset.gallery_trials:
        from ..eval import sysu_gallery, sysu_query

        q_paths, q_pids, q_cams = sysu_query(root, config.eval.mode)
        gallery: list[ImageRecord] = []
        position: dict[str, int] = {}
        trials = []
        for trial in range(config.eval.trials):
            paths, pids, cams = sysu_gallery(root, config.eval.mode, trial=trial)
            chosen = []
            for record in _records(paths, pids, cams, VISIBLE):
                if record.path not in position:
                    position[record.path] = len(gallery)
                    gallery.append(record)
                chosen.append(position[record.path])
            trials.append(np.asarray(chosen, dtype=np.int64))
        return TestSet(dataset.protocol, _records(q_paths, q_pids, q_cams, INFRARED), gallery, trials)
    if not dataset.query or not dataset.gallery:
        raise ValueError(f"dataset {config.data.dataset} at {root} defines no query/gallery split to evaluate on")
    return TestSet(dataset.protocol, list(dataset.query), list(dataset.gallery),
                   [np.arange(len(dataset.gallery), dtype=np.int64)])
