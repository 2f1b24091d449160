"""Image loading: PIL decode to RGB, resize to the configured (H, W), and a PyTorch ``Dataset`` over records.

Infrared images are stored as three-channel replicas (SYSU-MM01) or single-channel files (some RegDB copies); both
come out as RGB with three equal channels. Unreadable or corrupt files raise :class:`BadImageError` naming them, or,
with ``skip_bad_images=True``, are dropped when the dataset is built, with one warning giving the count. "Unreadable"
is any failure while decoding (whatever Pillow raises: truncated data, unknown format, bad headers, ...) and any image
whose declared width x height exceeds ``max_pixels`` (a decompression bomb: a few KB on disk that would decode to
gigabytes), checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .records import ImageRecord, list_some

DEFAULT_SIZE = (288, 144)  # (H, W), the input size of every seed method
INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


# Pillow's own default limit (PIL.Image.MAX_IMAGE_PIXELS): about 0.27 GB of RGB once decoded.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImageError(OSError):
    """One or more image files cannot be decoded. ``files`` lists ``(path, reason)``."""

    def __init__(self, files: Sequence[tuple[str, str]] | str):
        if isinstance(files, str):  # re-raised from a DataLoader worker, which passes the formatted message only
            self.files = []
            super().__init__(files)
            return
        self.files = list(files)
        listed = list_some(f"{path} ({reason})" for path, reason in self.files)
        super().__init__(f"{len(self.files)} unreadable image file(s): {listed}; fix or remove them, or pass "
                         "skip_bad_images=True (training: data.skip_bad_images=true) to skip them with a warning")


def _check_size(size) -> tuple[int, int]:
    if size is None:
        return None
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_max_pixels(max_pixels) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer (width x height), got {max_pixels!r}; the default "
                         f"is {DEFAULT_MAX_PIXELS}")
    return max_pixels


def load_image(path: str, size: tuple[int, int] | None = DEFAULT_SIZE, interpolation: str = "bicubic",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` to an RGB PIL image, resized to ``size`` = (H, W) unless None.

    Raises :class:`BadImageError` naming the file for anything that goes wrong while reading it, including a
    declared width x height above ``max_pixels``. Pillow refuses images above twice its own global
    ``PIL.Image.MAX_IMAGE_PIXELS`` before this check sees them; raise that too for a larger ``max_pixels``.
    """
    size = _check_size(size)
    if interpolation not in INTERPOLATION:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATION)}, got {interpolation!r}")
    max_pixels = _check_max_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; the explicit max_pixels check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImageError([(str(path), f"{width}x{height} = {width * height} pixels exceeds "
                                                     f"max_pixels={max_pixels} (decompression bomb?); raise "
                                                     "max_pixels (data.max_image_pixels) if the image is genuine")])
                image.load()  # full decode: truncated files fail here, not later
                rgb = image.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), INTERPOLATION[interpolation])
    except BadImageError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a corrupt file makes Pillow raise, the file is the problem
        raise BadImageError([(str(path), f"{type(error).__name__}: {error}")]) from error
    return rgb


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def find_bad_images(paths: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, str]]:
    """Decode every file; return ``(path, reason)`` for those that fail (empty list when all are fine)."""
    bad = []
    for path in paths:
        try:
            load_image(path, size=None, max_pixels=max_pixels)
        except BadImageError as error:
            bad.extend(error.files)
    return bad


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``records`` as ``(image, label, index)``.

    image: (3, H, W) uint8 tensor at ``size`` (then ``transform(image)`` if given; batch augmentation is meant to run
    on the device, see :mod:`vireid_fast.data.transforms`); label: int, the record's pid unless ``labels`` (e.g.
    pseudo-labels, -1 = outlier) are given or set later with :meth:`set_labels`; index: position in this dataset.
    skip_bad_images: decode every file now and drop the unreadable ones with a warning (``skipped`` lists them;
    with ``cache`` the decoded images are kept, so nothing is decoded twice); otherwise a bad file raises
    BadImageError when loaded. cache: keep decoded images in memory. max_pixels: see :func:`load_image`.
    """

    def __init__(self, records: Sequence[ImageRecord], size: tuple[int, int] | None = DEFAULT_SIZE,
                 labels: Sequence[int] | None = None, transform: Callable | None = None,
                 skip_bad_images: bool = False, cache: bool = False, interpolation: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        records = list(records)
        if labels is not None and len(labels) != len(records):
            raise ValueError(f"labels has {len(labels)} entries but there are {len(records)} records")
        self.size = _check_size(size)
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATION)}, got {interpolation!r}")
        self.interpolation = interpolation
        self.max_pixels = _check_max_pixels(max_pixels)
        self.transform = transform
        self.skipped: list[tuple[str, str]] = []
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        if skip_bad_images:
            keep, decoded = [], []
            for i, record in enumerate(records):
                try:
                    image = load_image(record.path, self.size, interpolation, self.max_pixels)
                except BadImageError as error:
                    self.skipped.extend(error.files)
                    continue
                keep.append(i)
                if cache:
                    decoded.append(to_tensor(image))
            if self.skipped:
                warnings.warn(f"skipped {len(records) - len(keep)} unreadable image(s) of {len(records)}: "
                              f"{list_some(p for p, _ in self.skipped)}", RuntimeWarning, stacklevel=2)
                records = [records[i] for i in keep]
                labels = None if labels is None else [labels[i] for i in keep]
            if cache:
                self._cache = dict(enumerate(decoded))
        self.records = records
        self.labels = np.array([r.pid for r in records] if labels is None else list(labels), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def set_labels(self, labels: Sequence[int]) -> None:
        """Replace the labels (e.g. this epoch's pseudo-labels; -1 = outlier). Same length as the dataset."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(self.records),):
            raise ValueError(f"labels must have shape ({len(self.records)},), got {tuple(labels.shape)}")
        self.labels = labels

    def load(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = to_tensor(load_image(self.records[index].path, self.size, self.interpolation, self.max_pixels))
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index
