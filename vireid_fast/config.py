"""Training configuration: typed sections, YAML loading, ``key=value`` overrides, validation with messages naming
the key.

A config file is YAML with the sections below; every key is optional (defaults shown by ``vireid-fast train
--print-config``). Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key
(``train.lr: must be > 0, got -1``). Method-specific keys live under ``method:`` and are declared by the method
plug-in (see :mod:`vireid_fast.methods`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .methods import get_method
from .schema import spec


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass
class ExperimentConfig:
    name: str = spec("run", help="run name (used in the output folder)")
    output_dir: str = spec("runs/run", help="folder for checkpoints, metrics.jsonl and plots")
    seed: int = spec(0, help="seed of every random draw (python, numpy, torch, samplers, augmentation)")
    deterministic: bool = spec(True, help="deterministic algorithms (CPU runs are then bit-reproducible)")
    device: str = spec("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    amp: str = spec("none", choices=("none", "bf16", "fp16"), help="autocast dtype on CUDA (ignored on CPU)")
    threads: int = spec(0, min=0, help="torch CPU threads (0 = torch default)")


@dataclass
class DataConfig:
    dataset: str = spec("synthetic", help="registered dataset name: synthetic, sysu_mm01, sysu_mm01_prepared, "
                                          "regdb, regdb_prepared")
    root: str = spec("", help="dataset folder (synthetic: generated there when missing; empty = cache folder)")
    trial: int = spec(1, min=1, max=10, help="RegDB trial (split) 1..10")
    image_size: list = spec([288, 144], length=2, help="(height, width) of network inputs")
    cache_images: bool = spec(False, help="keep decoded training images in memory across epochs")
    skip_bad_images: bool = spec(False, help="decode every image once at start-up and drop unreadable ones (counted "
                                             "in the log) instead of stopping at the first")
    max_image_pixels: int = spec(89_478_485, min=1, help="images with more pixels (width x height) are refused as "
                                                         "unreadable (decompression-bomb guard; Pillow's default)")
    num_workers: int = spec(0, min=0, help="DataLoader worker processes for image decoding")
    synthetic_size: str = spec("small", choices=("tiny", "small", "medium", "large"),
                               help="preset of the generated synthetic dataset")
    synthetic_ids: int = spec(0, min=0, help="identities of the synthetic dataset (0 = preset's)")
    synthetic_seed: int = spec(0, min=0, help="seed of the generated synthetic dataset (independent of "
                                             "experiment.seed, so seeds of a comparison train on the same data)")


@dataclass
class ModelConfig:
    arch: str = spec("agw_resnet50", choices=("agw_resnet50", "small_resnet"))
    pretrained: str = spec("", help="local torchvision-format state dict (e.g. ImageNet ResNet-50), or 'synthetic' "
                                    "for the synthetic identity pretraining of small_resnet ('' = random init)")
    non_local: bool = spec(True, help="non-local blocks (AGW)")
    gem_p: float = spec(3.0, min=1.0, help="GeM pooling exponent")
    last_stride: int = spec(1, choices=(1, 2))
    widths: list = spec([32, 64, 128, 256], length=4, help="small_resnet stage widths")
    ema_beta: float = spec(0.999, min=0.0, max=0.999999, help="momentum encoder beta (PCLHD Eq. 16)")
    use_ema: bool = spec(False, help="keep an EMA copy of the encoder (PCLHD's momentum encoder)")


@dataclass
class ClusterConfig:
    eps: float = spec(0.6, min=0.0, max=1.0, min_exclusive=True, help="DBSCAN radius on the Jaccard distance")
    min_samples: int = spec(4, min=1, help="DBSCAN min_samples")
    k1: int = spec(30, min=1, help="k-reciprocal neighbourhood size")
    k2: int = spec(6, min=1, help="query-expansion size")


@dataclass
class TrainConfig:
    epochs: int = spec(50, min=1)
    iters: int = spec(200, min=1, help="iterations per epoch (T)")
    num_identities: int = spec(8, min=1, help="P: pseudo-identities per batch and modality")
    num_instances: int = spec(16, min=1, help="K: instances per pseudo-identity")
    lr: float = spec(3.5e-4, min=0.0, min_exclusive=True, help="Adam learning rate")
    weight_decay: float = spec(5e-4, min=0.0)
    step_size: int = spec(20, min=1, help="epochs between learning-rate decays")
    gamma: float = spec(0.1, min=0.0, max=1.0, min_exclusive=True, help="learning-rate decay factor")
    eval_every: int = spec(10, min=0, help="evaluate every E epochs (0 = only at the end)")
    padding: int = spec(10, min=0, help="zero padding before the random crop")
    flip_p: float = spec(0.5, min=0.0, max=1.0)
    erasing_p: float = spec(0.5, min=0.0, max=1.0, help="random erasing probability")
    color_jitter: bool = spec(False, help="colour jitter (0.4, 0.4, 0.4, 0) on the visible stream")


@dataclass
class EvalConfig:
    mode: str = spec("all", choices=("all", "indoor"), help="SYSU-MM01 search mode")
    trials: int = spec(1, min=1, max=10, help="gallery samplings (SYSU) averaged")
    batch_size: int = spec(128, min=1)
    eval_untrained: bool = spec(True, help="also evaluate the model before training (epoch 0)")


SECTIONS = {"experiment": ExperimentConfig, "data": DataConfig, "model": ModelConfig, "cluster": ClusterConfig,
            "train": TrainConfig, "eval": EvalConfig}

# Keys that may change between a run and its resumption (they do not change what is computed per epoch).
# data.skip_bad_images and data.max_image_pixels only decide what happens to unreadable images (stop or drop), not
# what is computed from readable ones; leaving them out of the hash also keeps older checkpoints resumable.
RESUMABLE_KEYS = {"experiment.output_dir", "experiment.name", "data.root", "data.num_workers", "data.cache_images",
                  "data.skip_bad_images", "data.max_image_pixels", "train.epochs", "train.eval_every",
                  "eval.eval_untrained", "eval.batch_size", "eval.trials", "eval.mode", "experiment.threads"}


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: Any = None  # the method's params dataclass (with a ``name`` field)

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = dataclasses.asdict(self.method)
        return out

    def hash(self) -> str:
        """sha256 over the values that define the run (not output paths, epochs or evaluation cadence)."""
        flat = {k: v for k, v in flatten(self.to_dict()).items() if k not in RESUMABLE_KEYS}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list"}.get(tp, str(tp))


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value, tp, meta: dict):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r} ({type(value).__name__})")
    elif tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every < / > range check below, so it is refused here
            raise ConfigError(f"{key}: must be a finite number, got {value!r}; set a finite value (defaults: "
                              "vireid-fast train --print-config)")
    elif tp is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r} ({type(value).__name__})")
    elif tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        if meta.get("length") is not None and len(value) != meta["length"]:
            raise ConfigError(f"{key}: must have {meta['length']} entries, got {len(value)}: {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{key}: entries must be positive integers, got {value!r}")
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    if lo is not None and isinstance(value, (int, float)):
        if value < lo or (meta.get("min_exclusive") and value == lo):
            raise ConfigError(f"{key}: must be {'>' if meta.get('min_exclusive') else '>='} {lo}, got {value!r}")
    if hi is not None and isinstance(value, (int, float)) and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")
    return value


def _unknown(key, known) -> ConfigError:
    key = str(key)  # YAML keys may be numbers or booleans
    leaf = key.rsplit(".", 1)
    close = difflib.get_close_matches(leaf[-1], list(known), n=1)
    hint = f" (did you mean '{(leaf[0] + '.') if len(leaf) == 2 else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; known keys here: {', '.join(sorted(known))}")


def build_section(name: str, cls, values: dict | None):
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", fields)
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key], dict(fields[key].metadata))
    return cls(**kwargs)


def parse_overrides(overrides) -> dict:
    """``["train.lr=1e-3", "method.temp=0.1"]`` -> nested dict (values parsed as YAML scalars/lists)."""
    nested: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. train.lr), one dot")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {error}") from None
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def from_dict(raw: dict | None) -> Config:
    """Validate a nested dict into a :class:`Config` (method params checked by the method's declaration)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS and name != "method":
            raise _unknown(name, list(SECTIONS) + ["method"])
    sections = {name: build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    if not isinstance(raw.get("method") or {}, dict):
        raise ConfigError(f"method: must be a mapping of keys to values (at least 'name', e.g. "
                          f"'method: {{name: dcl}}'), got {raw['method']!r}")
    method_raw = dict(raw.get("method") or {})
    method_name = method_raw.get("name", "dcl")
    try:
        method_cls = get_method(method_name)
    except ValueError as error:
        raise ConfigError(f"method.name: {error}") from None
    method_raw["name"] = method_name
    sections["method"] = build_section("method", method_cls.Params, method_raw)
    return Config(**sections)


def load_config(path: str | None = None, overrides=None) -> Config:
    """Read a YAML file (or only defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found (see configs/ for examples)")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a mapping of sections (experiment, data, model, ...)")
        for name, section in raw.items():  # before merging: an override must not hide a malformed section
            if (name in SECTIONS or name == "method") and section is not None and not isinstance(section, dict):
                raise ConfigError(f"{name}: must be a mapping of keys to values, got {section!r} (in {path}); write "
                                  f"it as '{name}:' followed by indented 'key: value' lines")
    return from_dict(merge(raw, parse_overrides(overrides)))


def describe() -> str:
    """Every key with its default and help, for documentation and ``--print-config``."""
    from .methods import METHODS  # the registry as it is now (plug-ins may register after import)

    lines = []
    for name, cls in list(SECTIONS.items()) + [(f"method ({m})", c.Params) for m, c in METHODS.items()]:
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {f.metadata.get('help', '')}".rstrip(" #"))
    return "\n".join(lines)
