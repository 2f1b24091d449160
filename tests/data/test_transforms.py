"""Transforms: shapes, ranges, the channel augmentation's outcomes, seeded determinism, test-time views."""

import pytest
import torch

from vireid_fast.data.transforms import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelAugmentation,
    TestTransform,
    TrainTransform,
)


def batch(b=6, h=32, w=16, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(images):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (images.float() / 255 - mean) / std


def test_train_transform_shapes_ranges_and_identity_settings():
    images = batch()
    out = TrainTransform(size=(32, 16), color_jitter=(0.2, 0.2, 0.2, 0.05), channel_augmentation="adapt_gray",
                         seed=0)(images)
    assert out.shape == (6, 3, 32, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert out.min() >= low - 1e-4 and out.max() <= high + 1e-4
    # with every random step disabled the transform is resize + normalise only
    plain = TrainTransform(size=(32, 16), padding=0, flip_p=0, erasing_p=0)
    torch.testing.assert_close(plain(images), normalised(images))
    resized = TrainTransform(size=(64, 32), padding=0, flip_p=0, erasing_p=0)(images)
    assert resized.shape == (6, 3, 64, 32)
    flipped = TrainTransform(size=(32, 16), padding=0, flip_p=1.0, erasing_p=0)(images)
    torch.testing.assert_close(flipped, normalised(images).flip(-1))


def test_crop_pads_with_zero_and_erasing_writes_mean():
    images = torch.full((8, 3, 32, 16), 255, dtype=torch.uint8)
    cropped = TrainTransform(size=(32, 16), padding=6, flip_p=0, erasing_p=0, seed=1)(images)
    # padding is black: some crops show it, and only values of white or black appear
    black, white = normalised(torch.zeros(1, 3, 1, 1)), normalised(torch.full((1, 3, 1, 1), 255))
    is_black = torch.isclose(cropped, black.expand_as(cropped), atol=1e-4).all(1)
    is_white = torch.isclose(cropped, white.expand_as(cropped), atol=1e-4).all(1)
    assert (is_black | is_white).all() and is_black.any()
    erased = TrainTransform(size=(32, 16), padding=0, flip_p=0, erasing_p=1.0, seed=1)(images)
    assert ((erased == 0).all(1).flatten(1).any(1)).all()  # every image has an erased (mean-colour) patch


def test_seeded_determinism():
    images = batch()
    kwargs = dict(size=(32, 16), color_jitter=(0.3, 0.3, 0.3, 0.1), channel_augmentation="exchange")
    a, b = TrainTransform(seed=7, **kwargs), TrainTransform(seed=7, **kwargs)
    first = [a(images) for _ in range(3)]
    second = [b(images) for _ in range(3)]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], first[1])  # successive calls draw anew
    assert not torch.equal(TrainTransform(seed=8, **kwargs)(images), first[0])
    state = torch.random.get_rng_state()
    a.reseed(7)
    assert torch.equal(a(images), first[0])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


@pytest.mark.parametrize("mode", ["adapt_gray", "exchange"])
def test_channel_augmentation_outcomes(mode):
    torch.manual_seed(0)
    images = torch.randn(400, 3, 4, 2)
    out = ChannelAugmentation(mode, gray_p=0.5)(images)
    gray = (torch.tensor(GRAY_WEIGHTS)[None, :, None, None] * images).sum(1, keepdim=True).expand_as(images)
    counts = {"r": 0, "g": 0, "b": 0, "gray": 0, "same": 0}
    for i in range(len(images)):
        outcomes = {"r": images[i, 0].expand(3, 4, 2), "g": images[i, 1].expand(3, 4, 2),
                    "b": images[i, 2].expand(3, 4, 2), "gray": gray[i], "same": images[i]}
        matched = [k for k, v in outcomes.items() if torch.allclose(out[i], v, atol=1e-5)]
        assert len(matched) == 1
        counts[matched[0]] += 1
    for channel in "rgb":
        assert 70 < counts[channel] < 130  # 1/4 each
    if mode == "exchange":
        assert counts["same"] == 0 and 70 < counts["gray"] < 130
    else:
        assert 25 < counts["gray"] < 75 and 25 < counts["same"] < 75  # 1/8 each
    assert torch.equal(ChannelAugmentation(mode, p=0.0)(images), images)
    with pytest.raises(ValueError, match="mode must be one of adapt_gray, exchange, got 'swap'"):
        ChannelAugmentation("swap")


def test_test_transform_views():
    images = batch(2, 40, 20)
    transform = TestTransform(size=(40, 20))
    x, flipped = transform.views(images)
    torch.testing.assert_close(x, normalised(images))
    torch.testing.assert_close(flipped, normalised(images).flip(-1))
    assert TestTransform(size=(20, 10))(images).shape == (2, 3, 20, 10)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\), got \(3, 40, 20\)"):
        transform(images[0])
