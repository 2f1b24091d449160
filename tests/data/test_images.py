"""Image loading and the Dataset: RGB decode, resize, corrupt files named or skipped with a count."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vireid_fast.data import ImageRecord
from vireid_fast.data.images import BadImageError, ImageDataset, find_bad_images, load_image

from .trees import write_image


def records_in(tmp_path, n=4):
    out = []
    for i in range(n):
        path = write_image(str(tmp_path / f"{i}.jpg"), 40 * i, size=(16, 8))
        out.append(ImageRecord(path, pid=i % 2, camid=1, modality="visible"))
    return out


def test_load_resizes_and_converts_grayscale_to_rgb(tmp_path):
    gray_path = str(tmp_path / "ir.bmp")
    Image.fromarray(np.arange(32, dtype=np.uint8).reshape(8, 4) * 8, "L").save(gray_path)
    image = load_image(gray_path, size=(24, 12))
    assert image.mode == "RGB" and image.size == (12, 24)
    array = np.asarray(image)
    assert np.array_equal(array[..., 0], array[..., 2])
    assert load_image(gray_path, size=None).size == (4, 8)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        load_image(gray_path, size=(0, 3))


def test_dataset_items(tmp_path):
    data = ImageDataset(records_in(tmp_path), size=(32, 16), cache=True)
    image, label, index = data[3]
    assert image.shape == (3, 32, 16) and image.dtype == torch.uint8
    assert label == 1 and index == 3
    assert data[3][0] is image  # cached
    data.set_labels([5, -1, 5, 2])
    assert data[1][1] == -1
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\), got \(3,\)"):
        data.set_labels([1, 2, 3])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 16) and batch[1].tolist() == [5, -1, 5, 2]
    flipped = ImageDataset(records_in(tmp_path), size=(32, 16), transform=lambda x: x.flip(-1))
    assert torch.equal(flipped[2][0], data[2][0].flip(-1))


def test_corrupt_files_are_named_or_skipped(tmp_path):
    records = records_in(tmp_path)
    truncated = records[1].path
    with open(truncated, "rb") as f:
        head = f.read(40)
    with open(truncated, "wb") as f:
        f.write(head)
    junk = str(tmp_path / "junk.jpg")
    with open(junk, "wb") as f:
        f.write(b"not an image at all")
    records.append(ImageRecord(junk, 9, 1, "visible"))
    records.append(ImageRecord(str(tmp_path / "absent.jpg"), 9, 1, "visible"))

    data = ImageDataset(records, size=(16, 8))
    assert len(data) == 6
    with pytest.raises(BadImageError, match=f"1 unreadable image file\\(s\\): {truncated} \\(OSError: .*\\); fix"):
        data[1]
    bad = [p for p, _ in find_bad_images([r.path for r in records])]
    assert bad == [truncated, junk, str(tmp_path / "absent.jpg")]

    with pytest.warns(RuntimeWarning, match=r"skipped 3 unreadable image\(s\) of 6: .*1\.jpg, .*junk\.jpg, .*absent"):
        skipping = ImageDataset(records, size=(16, 8), labels=[0, 1, 2, 3, 4, 5], skip_bad_images=True)
    assert len(skipping) == 3 and skipping.labels.tolist() == [0, 2, 3]
    assert [os.path.basename(p) for p, _ in skipping.skipped] == ["1.jpg", "junk.jpg", "absent.jpg"]
    assert all(skipping[i][0].shape == (3, 16, 8) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ImageDataset(records[:1], skip_bad_images=True)) == 1  # nothing bad: no warning
