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


def png_bomb(path: str, width: int, height: int) -> str:
    """A valid-looking PNG header declaring width x height (one row of data): a few bytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_bad_image_even_named_jpg(tmp_path):
    """Pillow raises DecompressionBombError (not an OSError) above twice its limit: it must not escape."""
    bomb = png_bomb(str(tmp_path / "bomb.jpg"), 100_000, 100_000)
    assert os.path.getsize(bomb) < 1000
    with pytest.raises(BadImageError, match=r"bomb\.jpg \(DecompressionBombError: .*\); fix or remove"):
        load_image(bomb)
    # Between the limit and twice it Pillow only warns: the explicit check refuses it, and no warning leaks.
    half = png_bomb(str(tmp_path / "half.png"), 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match=r"10000x10000 = 100000000 pixels exceeds max_pixels=89478485"):
            load_image(half)
    records = records_in(tmp_path, 2) + [ImageRecord(bomb, 5, 1, "visible"), ImageRecord(half, 5, 1, "visible")]
    with pytest.warns(RuntimeWarning, match=r"skipped 2 unreadable image\(s\) of 4: .*bomb\.jpg, .*half\.png"):
        data = ImageDataset(records, size=(16, 8), skip_bad_images=True, cache=True)
    assert len(data) == 2 and len(data._cache) == 2  # decoded once, during the check
    assert [p for p, _ in find_bad_images([r.path for r in records])] == [bomb, half]


def test_pixel_limit_is_configurable(tmp_path):
    path = write_image(str(tmp_path / "a.png"), 3, size=(16, 8))  # 128 pixels
    assert load_image(path, size=None, max_pixels=128).size == (8, 16)
    with pytest.raises(BadImageError, match=r"a\.png \(8x16 = 128 pixels exceeds max_pixels=127 .*raise max_pixels"):
        load_image(path, size=None, max_pixels=127)
    with pytest.raises(ValueError, match=r"max_pixels must be a positive integer .*got 0"):
        load_image(path, max_pixels=0)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert len(ImageDataset([ImageRecord(path, 0, 1, "visible")], skip_bad_images=True, max_pixels=100)) == 0


def test_any_decoder_exception_names_the_file(tmp_path, monkeypatch):
    path = write_image(str(tmp_path / "a.png"), 3)

    def broken_decoder(self):
        raise IndexError("tile index out of range")  # what some corrupt files make Pillow plug-ins raise

    monkeypatch.setattr(Image.Image, "load", broken_decoder)
    with pytest.raises(BadImageError, match=r"a\.png \(IndexError: tile index out of range\)"):
        load_image(path)


def test_bad_image_in_a_dataloader_worker_keeps_its_message(tmp_path):
    records = records_in(tmp_path, 2)
    with open(records[1].path, "wb") as f:
        f.write(b"junk")
    loader = torch.utils.data.DataLoader(ImageDataset(records, size=(16, 8)), batch_size=2, num_workers=1)
    with pytest.raises(BadImageError, match=r"1\.jpg \(UnidentifiedImageError"):
        next(iter(loader))
