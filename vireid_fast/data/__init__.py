"""Datasets: readers for SYSU-MM01 and RegDB layouts, the synthetic visible-infrared set, samplers, transforms.

Readers return per-modality lists of :class:`ImageRecord` and raise one :class:`DatasetError` listing every problem
in a malformed tree. Register a custom reader with ``@register_dataset("name")`` (see docs/data.md).
"""

from .images import BadImageError, ImageDataset, find_bad_images, load_image
from .market import PreparedRegDB, PreparedSYSUMM01, PreparedVIReID
from .records import IMAGE_EXTENSIONS, INFRARED, MODALITIES, VISIBLE, DatasetError, ImageRecord
from .regdb import RegDB
from .registry import (
    VIReIDDataset,
    create_dataset,
    get_dataset_class,
    list_datasets,
    register_dataset,
    unregister_dataset,
)
from .samplers import CameraAwareSampler, CrossModalityPairSampler, IdentityBalancedSampler
from .sysu import SYSUMM01, SyntheticVIReID
from .transforms import ChannelAugmentation, TestTransform, TrainTransform

__all__ = [
    "IMAGE_EXTENSIONS", "INFRARED", "MODALITIES", "VISIBLE", "DatasetError", "ImageRecord",
    "VIReIDDataset", "create_dataset", "get_dataset_class", "list_datasets", "register_dataset",
    "unregister_dataset", "SYSUMM01", "SyntheticVIReID", "generate",
    "PreparedRegDB", "PreparedSYSUMM01", "PreparedVIReID", "RegDB",
    "BadImageError", "ImageDataset", "find_bad_images", "load_image",
    "CameraAwareSampler", "CrossModalityPairSampler", "IdentityBalancedSampler",
    "ChannelAugmentation", "TestTransform", "TrainTransform",
]


def __getattr__(name: str):
    # Lazy, so that `python -m vireid_fast.data.synthetic` does not find the module already imported.
    if name == "generate":
        from .synthetic import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
