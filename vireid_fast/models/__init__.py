"""Encoders: AGW two-stream ResNet-50, a small two-stream ResNet for CPU, the EMA encoder, weight loading."""

from .agw import INFRARED, VISIBLE, GeM, NonLocal, TwoStreamResNet, agw_resnet50, small_resnet
from .ema import EMAEncoder
from .weights import LoadReport, load_pretrained, read_state_dict

ARCHITECTURES = {"agw_resnet50": agw_resnet50, "small_resnet": small_resnet}


def build_model(arch: str, **options) -> TwoStreamResNet:
    """``arch``: ``"agw_resnet50"`` or ``"small_resnet"``; options go to the factory."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**options)


__all__ = ["ARCHITECTURES", "EMAEncoder", "GeM", "INFRARED", "LoadReport", "NonLocal", "TwoStreamResNet", "VISIBLE",
           "agw_resnet50", "build_model", "load_pretrained", "read_state_dict", "small_resnet"]
