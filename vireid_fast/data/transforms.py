"""Batch augmentation on the device (CPU or GPU), built on kornia, plus the CAJ/DCL channel augmentation.

Training (:class:`TrainTransform`), in the seeds' order: resize to (H, W) if needed → random crop after zero padding →
horizontal flip → optional colour jitter → normalise (ImageNet mean/std) → random erasing (erased pixels = 0 after
normalisation, i.e. the mean colour) → optional channel augmentation (the "augmented stream" for visible images).
Test time (:class:`TestTransform`): resize + normalise, and the horizontally flipped copy for flip-averaged features.

Inputs: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1]. Outputs: float32 normalised. With ``seed`` set, the
random draws of call number n depend only on (seed, n), not on the global RNG, which is left untouched.
"""

from __future__ import annotations

import contextlib

import kornia.augmentation as K
import torch
from kornia.geometry.transform import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as the CAJ code uses
CHANNEL_MODES = ("adapt_gray", "exchange")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 [0, 255] or float [0, 1] -> float32 [0, 1] on the same device."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


class ChannelAugmentation(torch.nn.Module):
    """Channel augmentation of CAJ (ChannelAdapGray) and the DCL baseline (ChannelExchange), per image of a batch.

    Applied to an image with probability ``p``; then one of four outcomes is drawn uniformly: the R, G or B channel
    copied to all three channels, or the fourth: ``mode="adapt_gray"`` → grayscale with probability ``gray_p``,
    otherwise unchanged; ``mode="exchange"`` → always grayscale. Works on any (B, 3, H, W) float batch (the seeds
    apply it after normalisation); implemented as one per-image 3×3 channel-mixing matrix.
    """

    def __init__(self, mode: str = "adapt_gray", gray_p: float = 0.5, p: float = 1.0):
        super().__init__()
        if mode not in CHANNEL_MODES:
            raise ValueError(f"mode must be one of {', '.join(CHANNEL_MODES)}, got {mode!r}")
        for name, value in (("gray_p", gray_p), ("p", p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        self.mode, self.gray_p, self.p = mode, float(gray_p), float(p)

    def mixing(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 3, 3) matrices M with out[b, i] = Σ_j M[b, i, j] · in[b, j]."""
        choice = torch.randint(0, 4, (batch,))
        gray = choice == 3
        if self.mode == "adapt_gray":
            gray &= torch.rand(batch) < self.gray_p
        apply = torch.rand(batch) < self.p
        eye = torch.eye(3).expand(batch, 3, 3)
        single = torch.nn.functional.one_hot(choice.clamp(max=2), 3).float()[:, None, :].expand(batch, 3, 3)
        luma = torch.tensor(GRAY_WEIGHTS).expand(batch, 3, 3)
        matrices = torch.where((choice < 3)[:, None, None], single, torch.where(gray[:, None, None], luma, eye))
        return torch.where(apply[:, None, None], matrices, eye).to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        matrices = self.mixing(images.shape[0], images.device).to(images.dtype)
        return torch.einsum("bij,bjhw->bihw", matrices, images)


class _Seeded(torch.nn.Module):
    """Runs forward under a private RNG state derived from (seed, call number) when a seed is set."""

    def __init__(self, seed: int | None):
        super().__init__()
        self.seed = seed
        self.calls = 0

    def reseed(self, seed: int | None) -> None:
        self.seed, self.calls = seed, 0

    @contextlib.contextmanager
    def _rng(self, device: torch.device):
        if self.seed is None:
            yield
            return
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((int(self.seed) * 1_000_003 + self.calls) % (2 ** 63))
            self.calls += 1
            yield


class TrainTransform(_Seeded):
    """Training augmentation of a batch: (B, 3, H, W) uint8/float -> (B, 3, size[0], size[1]) float32 normalised.

    padding: zero padding before the random crop back to ``size``; flip_p: horizontal flip probability; erasing_p:
    random erasing probability (area ``erasing_scale`` of the image, aspect ``erasing_ratio``); color_jitter:
    ``(brightness, contrast, saturation, hue)`` or None, applied with probability ``color_jitter_p``;
    channel_augmentation: None, ``"adapt_gray"`` (CAJ) or ``"exchange"`` (DCL), with ``channel_p`` per image.
    """

    def __init__(self, size: tuple[int, int] = (288, 144), padding: int = 10, flip_p: float = 0.5,
                 erasing_p: float = 0.5, erasing_scale: tuple[float, float] = (0.02, 0.4),
                 erasing_ratio: tuple[float, float] = (0.3, 3.3),
                 color_jitter: tuple[float, float, float, float] | None = None, color_jitter_p: float = 0.8,
                 channel_augmentation: str | None = None, channel_p: float = 1.0, gray_p: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None):
        super().__init__(seed)
        self.size = (int(size[0]), int(size[1]))
        self.crop = K.RandomCrop(self.size, padding=int(padding), fill=0.0) if padding > 0 else None
        self.flip = K.RandomHorizontalFlip(p=flip_p) if flip_p > 0 else None
        self.jitter = K.ColorJitter(*color_jitter, p=color_jitter_p) if color_jitter is not None else None
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))
        self.erasing = K.RandomErasing(scale=erasing_scale, ratio=erasing_ratio, value=0.0, p=erasing_p) \
            if erasing_p > 0 else None
        self.channel = ChannelAugmentation(channel_augmentation, gray_p=gray_p, p=channel_p) \
            if channel_augmentation is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        with self._rng(x.device):
            if tuple(x.shape[-2:]) != self.size:
                x = resize(x, self.size, interpolation="bilinear", antialias=True)
            for step in (self.crop, self.flip, self.jitter):
                if step is not None:
                    x = step(x)
            x = self.normalize(x)
            if self.erasing is not None:
                x = self.erasing(x)
            if self.channel is not None:
                x = self.channel(x)
        return x


class TestTransform(torch.nn.Module):
    """Test-time: resize to ``size`` (antialiased bilinear) + normalise. ``flipped(x)`` gives the mirrored batch, for
    features averaged over the image and its horizontal flip (the evaluation protocol)."""

    __test__ = False  # not a pytest test class

    def __init__(self, size: tuple[int, int] = (288, 144), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        if tuple(x.shape[-2:]) != self.size:
            x = resize(x, self.size, interpolation="bilinear", antialias=True)
        return self.normalize(x)

    @staticmethod
    def flipped(images: torch.Tensor) -> torch.Tensor:
        return images.flip(-1)

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised, normalised and horizontally flipped)."""
        x = self(images)
        return x, x.flip(-1)
