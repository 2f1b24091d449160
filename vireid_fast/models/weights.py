"""Load torchvision-format ImageNet ResNet weights from a local file into a two-stream encoder (never downloads).

torchvision keys map as: ``conv1.*``/``bn1.*`` -> both ``visible_stem`` and ``infrared_stem``; ``layer{n}.*`` ->
``layer{n}.*``; ``fc.*`` is unused. Keys absent from the file, keys of the file the model does not have, and keys
whose shapes differ are all reported (and the mismatched ones skipped), never silently dropped.

A keyword instead of a path names generated weights: ``synthetic`` = the synthetic identity pretraining of
:mod:`vireid_fast.engine.pretrain` for the model's widths and the input size (shipped for the demo model, generated
and cached on first use otherwise). Keywords are registered by the module that produces them
(:func:`register_keyword`), so this module imports nothing from the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

STEM_KEYS = ("conv1.", "bn1.")
# keyword -> resolver(model, image_size (H, W) or None, log) -> path of a torchvision-format file
KEYWORDS: dict[str, Callable] = {}


def register_keyword(name: str, resolver: Callable) -> None:
    """Make ``model.pretrained: <name>`` resolve through ``resolver(model, image_size, log) -> path``."""
    KEYWORDS[name] = resolver


def resolve_pretrained(spec: str, model: nn.Module, image_size=None, log=print) -> str:
    """The file ``spec`` names: a registered keyword's weights for ``model`` at ``image_size`` (H, W), else ``spec``
    itself (a path)."""
    if spec in KEYWORDS:
        return KEYWORDS[spec](model, image_size, log)
    if spec == "synthetic":
        raise ValueError("model.pretrained='synthetic' is registered by vireid_fast.engine.pretrain; import "
                         "vireid_fast.engine (the trainer does) before loading it")
    return spec


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: ``loaded`` model keys; ``missing``: model keys the file did not provide;
    ``unexpected``: file keys with no model counterpart; ``mismatched``: (key, file shape, model shape)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def summary(self) -> str:
        def some(items):
            items = list(items)
            return ", ".join(items[:8]) + (f", ... (+{len(items) - 8})" if len(items) > 8 else "")

        lines = [f"pretrained weights {self.path}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing (kept at initialisation): {len(self.missing)}: {some(self.missing)}")
        if self.unexpected:
            lines.append(f"  unused keys of the file: {len(self.unexpected)}: {some(self.unexpected)}")
        if self.mismatched:
            lines.append(f"  shape mismatch (skipped): {len(self.mismatched)}: "
                         + some(f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched))
        return "\n".join(lines)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict from ``path`` (a plain dict, or one nested under ``state_dict``/``model``;
    a ``module.`` prefix from DataParallel is stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path} not found; download a torchvision ResNet checkpoint "
                                "(e.g. resnet50-0676ba61.pth) yourself and pass its path: vireid_fast never downloads")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for non-checkpoint or corrupt files
        raise ValueError(f"cannot read pretrained weights {path}: {type(error).__name__}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (a torchvision model.state_dict())")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str, verbose: bool = True, image_size=None, log=print) -> LoadReport:
    """Copy the weights of the torchvision-format file ``path`` into ``model`` (a :class:`TwoStreamResNet`).

    ``path`` may be a registered keyword (``"synthetic"``), resolved for ``model`` at ``image_size`` ((H, W) of the
    network input; None = the keyword's default, 32x16 for ``synthetic``) by :func:`resolve_pretrained`.
    """
    path = resolve_pretrained(path, model, image_size, log)
    source = read_state_dict(path)
    target = model.state_dict()
    report = LoadReport(path)
    provided: set[str] = set()
    new_state = {}
    for key, tensor in source.items():
        if key.startswith(STEM_KEYS):
            destinations = [f"visible_stem.{key}", f"infrared_stem.{key}"]
        else:
            destinations = [key]
        matched = False
        for dest in destinations:
            if dest not in target:
                continue
            matched = True
            provided.add(dest)
            if tuple(target[dest].shape) != tuple(tensor.shape):
                report.mismatched.append((dest, tuple(tensor.shape), tuple(target[dest].shape)))
                continue
            new_state[dest] = tensor.to(target[dest].dtype)
            report.loaded.append(dest)
        if not matched:
            report.unexpected.append(key)
    report.missing = [k for k in target if k not in provided and not k.endswith("num_batches_tracked")]
    if not report.loaded:
        raise ValueError(f"no tensor of {path} matches the model (file keys like {list(source)[:3]}); is it a "
                         "torchvision ResNet state dict of the right depth?")
    model.load_state_dict(new_state, strict=False)
    if verbose:
        print(report.summary())
    return report
