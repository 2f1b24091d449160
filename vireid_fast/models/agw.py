"""Two-stream re-identification encoders: AGW ResNet-50 (the seeds' backbone) and a small ResNet for CPU runs.

Structure (AGW, Ye et al. "Deep Learning for Person Re-identification: A Survey and Outlook"): a modality-specific
stem per modality (``visible_stem``, ``infrared_stem``: conv1, bn1, relu, maxpool), shared ``layer1..layer4`` (last
stride 1) with non-local blocks after the last blocks of layers 2 and 3, generalised-mean (GeM) pooling, and a
BNNeck (BatchNorm1d whose bias is frozen at 0). The embedding everything uses (clustering, memories, retrieval) is
the BNNeck output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modality import Modality
from .resnet import BLOCKS, Stem, init_weights, make_layer

VISIBLE, INFRARED = Modality.VISIBLE.code, Modality.INFRARED.code
#: What ``forward(..., outputs=...)`` can return: the stage-2, stage-3 and stage-4 maps (B, C, h, w), the pooled
#: feature and the BNNeck embedding (B, feature_dim).
OUTPUTS = ("stage2", "stage3", "stage4", "pooled", "feature")


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block with dot-product affinity divided by N (AGW's variant).

    x (B, C, H, W) -> x + BN(W(y)), y_i = (1/N) sum_j (theta_i . phi_j) g_j, inter-channels C / reduction. The final
    BN starts at zero weight so the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        inter = max(1, channels // reduction)
        self.g = nn.Conv2d(channels, inter, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.W = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x):
        b, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)          # (B, N, C')
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        phi = self.phi(x).flatten(2)                      # (B, C', N)
        affinity = torch.bmm(theta, phi) / (h * w)
        y = torch.bmm(affinity, g).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.W(y)


class GeM(nn.Module):
    """Generalised-mean pooling (B, C, H, W) -> (B, C): (mean x^p + eps)^(1/p) over H, W; AGW uses p = 3 (fixed).
    Inputs are post-ReLU (non-negative); they are clamped at 0 so a p-th root stays real."""

    def __init__(self, p: float = 3.0, eps: float = 1e-12):
        super().__init__()
        self.p, self.eps = float(p), eps

    def forward(self, x):
        return (x.clamp(min=0).pow(self.p).flatten(2).mean(-1) + self.eps).pow(1.0 / self.p)


class TwoStreamResNet(nn.Module):
    """Two-stream ResNet encoder.

    Args:
        block: ``"bottleneck"`` (ResNet-50) or ``"basic"``. layers: blocks per stage. widths: stage widths (before
        the block expansion). stem_width: stem channels. non_local: blocks per stage followed by a non-local block
        (counted from the end of the stage; AGW: (0, 2, 3, 0)). last_stride: stride of stage 4 (1 in AGW).
        gem_p: GeM exponent (None: average pooling).
    forward(images (B, 3, H, W) float32 normalised, modality (B,) int64 0 = visible / 1 = infrared, or one int or
    :class:`~vireid_fast.modality.Modality` for the whole batch) -> (B, feature_dim) float32 BNNeck embeddings
    (``return_pooled=True``: (pooled, bnneck); ``outputs=("stage4", "feature")``: a dict of the named entries of
    :data:`OUTPUTS`, so that wrappers such as DDP see one ``forward`` call).
    """

    def __init__(self, block: str = "bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width: int = 64,
                 non_local=(0, 2, 3, 0), last_stride: int = 1, gem_p: float | None = 3.0):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if not (len(layers) == len(widths) == len(non_local) == 4):
            raise ValueError("layers, widths and non_local need 4 entries (one per stage)")
        block_cls = BLOCKS[block]
        self.visible_stem = Stem(stem_width)
        self.infrared_stem = Stem(stem_width)
        inplanes = stem_width
        strides = (1, 2, 2, last_stride)
        self.non_local_after: list[list[int]] = []
        for stage in range(4):
            layer = make_layer(block_cls, inplanes, widths[stage], layers[stage], strides[stage])
            setattr(self, f"layer{stage + 1}", layer)
            inplanes = widths[stage] * block_cls.expansion
            count = int(non_local[stage])
            if count > layers[stage]:
                raise ValueError(f"non_local[{stage}]={count} exceeds the {layers[stage]} blocks of stage {stage + 1}")
            self.non_local_after.append(sorted(layers[stage] - 1 - i for i in range(count)))
            setattr(self, f"non_local{stage + 1}", nn.ModuleList(NonLocal(inplanes) for _ in range(count)))
        self.feature_dim = inplanes
        self.pool = GeM(gem_p) if gem_p is not None else None
        self.bnneck = nn.BatchNorm1d(inplanes)
        self.bnneck.bias.requires_grad_(False)
        init_weights(self)
        for stage in range(4):  # init_weights reset the non-local output BNs; they must start at zero
            for block_nl in getattr(self, f"non_local{stage + 1}"):
                nn.init.zeros_(block_nl.W[1].weight)
        # Both stems start from the same weights, as they do from ImageNet weights (conv1/bn1 copied into each):
        # the encoder starts modality-agnostic and the stems specialise during training.
        self.infrared_stem.load_state_dict(self.visible_stem.state_dict())

    def stems(self, images: torch.Tensor, modality) -> torch.Tensor:
        if isinstance(modality, Modality):
            modality = modality.code
        if isinstance(modality, int):
            return (self.visible_stem if modality == VISIBLE else self.infrared_stem)(images)
        if not isinstance(modality, torch.Tensor) or modality.shape != (images.shape[0],):
            raise ValueError(f"modality must be an int or a ({images.shape[0]},) tensor of 0/1")
        modality = modality.to(images.device)
        visible = modality == VISIBLE
        if bool(visible.all()):
            return self.visible_stem(images)
        if not bool(visible.any()):
            return self.infrared_stem(images)
        out_v = self.visible_stem(images[visible])
        out_i = self.infrared_stem(images[~visible])
        out = out_v.new_empty((images.shape[0],) + tuple(out_v.shape[1:]))
        out[visible] = out_v
        out[~visible] = out_i
        return out

    def forward(self, images: torch.Tensor, modality, return_pooled: bool = False,
                outputs: tuple[str, ...] | None = None):
        if outputs is not None:
            unknown = [name for name in outputs if name not in OUTPUTS]
            if unknown:
                raise ValueError(f"outputs: unknown entries {unknown}; choose from {', '.join(OUTPUTS)}")
        maps = {}
        x = self.stems(images, modality)
        for stage in range(4):
            layer = getattr(self, f"layer{stage + 1}")
            nl_blocks = getattr(self, f"non_local{stage + 1}")
            after = self.non_local_after[stage]
            for index, block in enumerate(layer):
                x = block(x)
                if index in after:
                    x = nl_blocks[after.index(index)](x)
            if stage >= 1:
                maps[f"stage{stage + 1}"] = x
        pooled = self.pool(x) if self.pool is not None else F.adaptive_avg_pool2d(x, 1).flatten(1)
        feat = self.bnneck(pooled)
        if outputs is not None:
            found = {**maps, "pooled": pooled, "feature": feat}
            return {name: found[name] for name in outputs}
        return (pooled, feat) if return_pooled else feat


def agw_resnet50(non_local: bool = True, last_stride: int = 1, gem_p: float | None = 3.0) -> TwoStreamResNet:
    """AGW two-stream ResNet-50: 2048-d embeddings."""
    return TwoStreamResNet("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64,
                           (0, 2, 3, 0) if non_local else (0, 0, 0, 0), last_stride, gem_p)


def small_resnet(widths=(32, 64, 128, 256), layers=(1, 1, 1, 1), non_local: bool = False, last_stride: int = 1,
                 gem_p: float | None = 3.0) -> TwoStreamResNet:
    """A small two-stream ResNet of basic blocks for CPU runs (default 256-d, ~1.2 M parameters)."""
    return TwoStreamResNet("basic", tuple(layers), tuple(widths), widths[0],
                           (0, 1, 1, 0) if non_local else (0, 0, 0, 0), last_stride, gem_p)
