"""Synthetic identity pretraining: the ImageNet analogue for the synthetic visible-infrared regime.

Every published VI-ReID method starts from ImageNet weights, so that clustering the first epoch's features already
finds identities. Here the encoder is pretrained by supervised identity classification (cross-entropy of a linear
classifier over the BNNeck embedding) on a pool of synthetic identities that is **disjoint** from every identity a
synthetic target set can hold: the pool is generated with dataset seed ``POOL_SEED_OFFSET + seed``, while target
sets use seeds below ``POOL_SEED_OFFSET`` (identities are drawn from ``(dataset seed, pid)``, see
:func:`vireid_fast.data.synthetic.make_identity`). Visible images only by default, through the visible stem; the
optional channel augmentation (R, G or B copied to all channels, or grayscale) makes part of them colourless, which
is what the infrared stream sees.

The result is a torchvision-format state dict (``conv1.*``/``bn1.*`` = the stem, ``layer{n}.*``, ``bnneck.*``) that
:func:`vireid_fast.models.load_pretrained` loads like an ImageNet checkpoint, cached under
``<cache>/pretrain-<config hash>/`` next to the synthetic datasets; ``model.pretrained: synthetic`` resolves to it
(shipped in ``vireid_fast/models/pretrained/`` for the demo model, generated on first use otherwise).

Determinism: one seed and one thread count give bit-identical weights (the global RNG state is restored afterwards,
so calling this from inside a run does not perturb the run's own random draws).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from ..config import ConfigError
from ..data import ImageDataset, ImageRecord, TrainTransform
from ..data.synthetic import INFRARED_CAMERAS, SIZES, VISIBLE_CAMERAS
from ..models import build_model
from ..models.weights import register_keyword
from .data import cache_dir, ensure_synthetic, generator_fingerprint, synthetic_root

# Bump when the training procedure changes in a way the config does not capture (invalidates caches and the shipped
# checkpoint's record, whose test then fails until it is regenerated).
PRETRAIN_VERSION = 1
# Dataset seeds of the pretraining pool start here; target synthetic sets must use smaller seeds.
POOL_SEED_OFFSET = 1 << 30
WEIGHTS_NAME = "weights.pth"
RECORD_NAME = "pretrain.json"
CHANNEL_MODES = ("none", "exchange", "adapt_gray")
MODALITY_CHOICES = ("visible", "separate", "both")


class PretrainConfigError(ConfigError):
    """An invalid pretraining setting; the message names the key, the value and the fix."""


@dataclass
class PretrainConfig:
    """Everything that defines a pretrained checkpoint (its content hash covers all fields).

    seed: training seed and pool index (pool dataset seed ``POOL_SEED_OFFSET + seed``); threads: torch CPU threads
    (part of the bit-exact recipe); ids: pool identities, all used for training; size: synthetic size preset (images
    per identity and camera); modalities: ``"visible"`` (the ImageNet analogue), ``"separate"`` (the pool's infrared
    images too, each (identity, modality) its own class: no cross-modality correspondence is taught) or ``"both"``
    (infrared images share their identity's class: supervised cross-modality learning), all through the one stem;
    image_size: (H, W) network input; widths, gem_p, last_stride: the ``small_resnet`` encoder; epochs,
    batch_size, lr (Adam, cosine decay to 0 over all iterations), weight_decay,
    label_smoothing: the classification; padding, flip_p, erasing_p: augmentation as in training; color_jitter:
    strength j of a brightness/contrast/saturation jitter (j, j, j, hue 0) with probability 0.8 (0 = off);
    channel_augmentation: ``"none"``, ``"exchange"`` (R/G/B/gray) or ``"adapt_gray"``, applied per image with
    probability ``channel_p``.
    """

    seed: int = 0
    threads: int = 1
    ids: int = 300
    size: str = "small"
    modalities: str = "visible"
    image_size: list = field(default_factory=lambda: [32, 16])
    widths: list = field(default_factory=lambda: [16, 32, 64, 128])
    gem_p: float | None = 3.0
    last_stride: int = 1
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    padding: int = 2
    flip_p: float = 0.5
    erasing_p: float = 0.5
    color_jitter: float = 0.0
    channel_augmentation: str = "none"
    channel_p: float = 0.0

    def validate(self) -> PretrainConfig:
        def fail(key, value, need):
            raise PretrainConfigError(f"pretrain {key}={value!r}: {need}")

        for key in ("seed", "threads", "ids", "epochs", "batch_size", "last_stride", "padding"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(key, value, "must be an integer")
        if not 0 <= self.seed < POOL_SEED_OFFSET:
            fail("seed", self.seed, f"must be in [0, {POOL_SEED_OFFSET}) (the pool seed is {POOL_SEED_OFFSET} + seed)")
        for key, low in (("threads", 1), ("ids", 2), ("epochs", 1), ("batch_size", 2)):
            if getattr(self, key) < low:
                fail(key, getattr(self, key), f"must be >= {low}")
        if self.size not in SIZES:
            fail("size", self.size, f"choose one of {', '.join(SIZES)}")
        if self.modalities not in MODALITY_CHOICES:
            fail("modalities", self.modalities, f"choose one of {', '.join(MODALITY_CHOICES)}")
        for key, length in (("image_size", 2), ("widths", 4)):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or len(value) != length or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                fail(key, value, f"must be a list of {length} positive integers")
        if self.image_size[0] < 16 or self.image_size[1] < 8:
            fail("image_size", self.image_size, "must be at least [16, 8] (H, W)")
        if self.gem_p is not None and not (isinstance(self.gem_p, (int, float)) and self.gem_p >= 1.0):
            fail("gem_p", self.gem_p, "must be >= 1 (or null for average pooling)")
        if self.last_stride not in (1, 2):
            fail("last_stride", self.last_stride, "choose 1 or 2")
        for key in ("lr", "weight_decay", "label_smoothing", "flip_p", "erasing_p", "channel_p",
                    "color_jitter"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                fail(key, value, "must be a finite number")
        if self.lr <= 0:
            fail("lr", self.lr, "must be > 0")
        for key in ("label_smoothing", "flip_p", "erasing_p", "channel_p", "color_jitter"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, getattr(self, key), "must be in [0, 1]")
        if self.weight_decay < 0:
            fail("weight_decay", self.weight_decay, "must be >= 0")
        if self.channel_augmentation not in CHANNEL_MODES:
            fail("channel_augmentation", self.channel_augmentation, f"choose one of {', '.join(CHANNEL_MODES)}")
        if self.padding < 0:
            fail("padding", self.padding, "must be >= 0")
        return self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def hash(self) -> str:
        """16 hex digits of sha256 over the config, the procedure version and the synthetic generator's source."""
        payload = {"config": self.to_dict(), "version": PRETRAIN_VERSION, "generator": generator_fingerprint()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def command(self, out: str | None = None) -> str:
        """The ``vireid-fast pretrain`` command line that reproduces this config with every key spelled out."""
        def text(value):
            if value is None:
                return "null"
            if isinstance(value, (list, tuple)):
                return "[" + ",".join(text(v) for v in value) + "]"
            return str(value)

        return "vireid-fast pretrain" + (f" --out {out}" if out else "") + "".join(
            f" {k}={text(v)}" for k, v in self.to_dict().items())

    @property
    def pool_seed(self) -> int:
        return POOL_SEED_OFFSET + self.seed


def make_config(overrides=(), base: dict | None = None) -> PretrainConfig:
    """A validated :class:`PretrainConfig` from ``base`` (e.g. a YAML mapping) and ``key=value`` overrides (values
    parsed as YAML: ``epochs=5 widths=[8,16,16,32] channel_augmentation=exchange``)."""
    values = dict(base or {})
    for item in overrides:
        if "=" not in item:
            raise PretrainConfigError(f"override {item!r} must look like key=value (e.g. epochs=5)")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PretrainConfigError(f"unknown pretrain key(s) {', '.join(unknown)}; valid keys: "
                                  f"{', '.join(sorted(known))}")
    return PretrainConfig(**values).validate()


def pool_root(config: PretrainConfig) -> str:
    """The cache folder of the pretraining pool (a synthetic dataset, next to the target sets)."""
    return synthetic_root(config.size, config.ids, config.pool_seed)


def pool_records(root: str, modalities: str = "visible") -> tuple[list[ImageRecord], list[int]]:
    """(records, pids) of every image of the pool in ``root`` (all its identities, whatever split they are in);
    records ordered by (camera, pid, file), pids sorted."""
    cams = VISIBLE_CAMERAS + (INFRARED_CAMERAS if modalities != "visible" else ())
    records = []
    for cam in sorted(cams):
        folder = os.path.join(root, f"cam{cam}")
        for pid_name in sorted(os.listdir(folder)):
            for name in sorted(os.listdir(os.path.join(folder, pid_name))):
                records.append(ImageRecord(os.path.join(folder, pid_name, name), int(pid_name), cam,
                                           "infrared" if cam in INFRARED_CAMERAS else "visible"))
    pids = sorted({r.pid for r in records})
    return records, pids


def _bar(total: int, progress: bool | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None if progress is None else not progress)


@dataclass
class PretrainResult:
    """path: the weights (torchvision format); record: the JSON record written next to them."""

    path: str
    record: dict


def cached_path(config: PretrainConfig) -> str:
    return os.path.join(cache_dir(), f"pretrain-{config.hash()}", WEIGHTS_NAME)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_encoder(config: PretrainConfig, log=print, progress: bool | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Pretrain and return (torchvision-format state dict, per-epoch history of loss / training accuracy).

    The torch global RNG state and thread count are restored on return.
    """
    config.validate()
    root = ensure_synthetic(pool_root(config), config.size, config.ids, config.pool_seed, log)
    records, pids = pool_records(root, config.modalities)
    if config.modalities == "separate":
        classes = sorted({(r.pid, r.modality) for r in records})
    else:
        classes = [(pid, None) for pid in pids]
    label_of = {c: i for i, c in enumerate(classes)}
    size = (int(config.image_size[0]), int(config.image_size[1]))
    dataset = ImageDataset(records, size=size)
    images = torch.stack([dataset.load(i) for i in range(len(dataset))])  # (N, 3, H, W) uint8
    labels = torch.tensor([label_of[(r.pid, r.modality if config.modalities == "separate" else None)]
                           for r in records], dtype=torch.int64)
    n = len(records)
    log(f"pretraining pool {root}: {len(pids)} identities, {len(classes)} classes, {n} images "
        f"({config.modalities}), {size[0]}x{size[1]}")

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model("small_resnet", widths=tuple(config.widths), non_local=False,
                                last_stride=config.last_stride, gem_p=config.gem_p)
            classifier = torch.nn.Linear(model.feature_dim, len(classes), bias=False)
            torch.nn.init.normal_(classifier.weight, std=0.001)
            params = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
            optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
            batches = n // config.batch_size  # the ragged tail is dropped (BN needs > 1 sample)
            if batches == 0:
                raise PretrainConfigError(f"pretrain batch_size={config.batch_size} exceeds the {n} pool images; "
                                          "lower batch_size or raise ids")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * batches)
            mode = None if config.channel_augmentation == "none" else config.channel_augmentation
            augment = TrainTransform(size, padding=config.padding, flip_p=config.flip_p, erasing_p=config.erasing_p,
                                     color_jitter=(config.color_jitter,) * 3 + (0.0,) if config.color_jitter else None,
                                     channel_augmentation=mode, channel_p=config.channel_p, seed=config.seed)
            criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
            order_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + 17)
            history = []
            model.train()
            with _bar(config.epochs * batches, progress, "pretrain") as bar:
                for epoch in range(config.epochs):
                    augment.reseed(config.seed * 1_000_003 + epoch)
                    order = torch.randperm(n, generator=order_rng)
                    loss_sum, correct = 0.0, 0
                    for b in range(batches):
                        index = order[b * config.batch_size:(b + 1) * config.batch_size]
                        x = augment(images[index])
                        target = labels[index]
                        logits = classifier(model(x, 0))
                        loss = criterion(logits, target)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"pretrain loss is {float(loss)} at epoch {epoch + 1}, batch "
                                                     f"{b + 1}; lower lr (now {config.lr})")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        loss_sum += float(loss.detach())
                        correct += int((logits.argmax(1) == target).sum())
                        bar.update(1)
                    row = {"epoch": epoch + 1, "loss": loss_sum / batches,
                           "train_acc": correct / (batches * config.batch_size)}
                    history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}")
                    log(f"pretrain epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f} "
                        f"train accuracy {row['train_acc']:.3f}")
    finally:
        torch.set_num_threads(threads)
    return to_torchvision(model), history


def to_torchvision(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict in torchvision naming: the visible stem as ``conv1.*``/``bn1.*``, the shared stages
    and the BNNeck under their own names (the infrared stem is not exported: one stem, as in an ImageNet file)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("infrared_stem."):
            continue
        if key.startswith("visible_stem."):
            key = key[len("visible_stem."):]
        out[key] = value.detach().clone().contiguous()
    return out


def pretrain(config: PretrainConfig, out: str | None = None, log=print, progress: bool | None = None,
             command: str | None = None) -> PretrainResult:
    """The weights of ``config``: from the cache when present, else trained and cached (atomically). ``out``: also
    copy the weights and the record there (``out`` is the .pth path; the record goes to ``<out minus .pth>.json``).
    """
    config.validate()
    path = cached_path(config)
    record_path = os.path.join(os.path.dirname(path), RECORD_NAME)
    if os.path.isfile(path) and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        log(f"pretrained weights (cached): {path}")
    else:
        start = time.perf_counter()
        state, history = train_encoder(config, log, progress)
        seconds = time.perf_counter() - start
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.partial-{os.getpid()}"
        torch.save(state, tmp)
        record = {
            "config": config.to_dict(), "config_hash": config.hash(), "pretrain_version": PRETRAIN_VERSION,
            "generator_fingerprint": generator_fingerprint(), "pool_seed": config.pool_seed,
            "command": command or config.command(),
            "seed": config.seed, "threads": config.threads, "sha256": sha256_file(tmp),
            "bytes": os.path.getsize(tmp), "torch": torch.__version__, "cpu": cpu_model(),
            "seconds": round(seconds, 1), "history": history,
        }
        with open(f"{record_path}.partial-{os.getpid()}", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        os.replace(f"{record_path}.partial-{os.getpid()}", record_path)
        log(f"pretrained weights: {path} ({seconds:.0f} s)")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        shutil.copyfile(path, out)
        record = dict(record, command=command or config.command(out))
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
        path = out
    return PretrainResult(path, record)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------- model.pretrained keyword
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pretrained")


# What ``model.pretrained: synthetic`` trains, on top of the PretrainConfig defaults (the visible-only ImageNet
# analogue). Measured on the demo set (docs/training.md): visible-only pretraining, with or without channel
# augmentation, leaves the first-epoch infrared ARI at 0.08-0.18; adding the pool's infrared images as classes of
# their own lifts it to 0.32 while the untrained cross-modality mAP stays near the visible-only start (14.4 vs 12.6;
# 30.5 when infrared images share their identity's class), so cross-modality association is still left to the method.
SYNTHETIC_RECIPE = {"modalities": "separate", "color_jitter": 0.4}


def config_for_model(model: torch.nn.Module, image_size=None) -> PretrainConfig:
    """The ``synthetic`` pretraining recipe (:data:`SYNTHETIC_RECIPE`) for ``model`` (a ``small_resnet``): its
    widths, pooling and last stride, at ``image_size`` (H, W; None = the recipe's default)."""
    from ..models.resnet import BasicBlock

    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if any(s is None for s in stages) or not all(len(s) == 1 and isinstance(s[0], BasicBlock) for s in stages) or any(
            len(getattr(model, f"non_local{i}")) for i in range(1, 5)):
        raise ValueError("model.pretrained=synthetic needs model.arch=small_resnet with one basic block per stage "
                         "and model.non_local=false; for agw_resnet50 pass a torchvision ResNet-50 file instead")
    config = PretrainConfig(**SYNTHETIC_RECIPE, widths=[int(s[0].conv1.out_channels) for s in stages],
                            last_stride=int(stages[3][0].conv1.stride[0]),
                            gem_p=None if model.pool is None else float(model.pool.p))
    if image_size is not None:
        config.image_size = [int(image_size[0]), int(image_size[1])]
    return config.validate()


def shipped_weights(config: PretrainConfig) -> str | None:
    """The shipped checkpoint recorded with ``config``'s hash whose file matches the recorded sha256, or None."""
    if not os.path.isdir(SHIPPED_DIR):
        return None
    want = config.hash()
    for name in sorted(os.listdir(SHIPPED_DIR)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(SHIPPED_DIR, name)) as f:
            record = json.load(f)
        path = os.path.join(SHIPPED_DIR, name[:-5] + ".pth")
        if record.get("config_hash") == want and os.path.isfile(path) and sha256_file(path) == record.get("sha256"):
            return path
    return None


def resolve_synthetic(model: torch.nn.Module, image_size=None, log=print) -> str:
    """Path of the synthetic-pretrained weights for ``model`` at ``image_size``: shipped, cached, or trained now."""
    config = config_for_model(model, image_size)
    path = shipped_weights(config)
    if path is not None:
        return path
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 pretrains (or finds the cache) first; one pool, one training
        return pretrain(config, log=log).path
    if not os.path.isfile(cached_path(config)):
        log(f"model.pretrained=synthetic: no shipped or cached weights for {config.to_dict()}; pretraining now "
            "(minutes on a CPU; cached for later runs)")
    path = pretrain(config, log=log).path
    if distributed:
        torch.distributed.barrier()
    return path


register_keyword("synthetic", resolve_synthetic)


# ------------------------------------------------------------------------------------------- measurement
def first_epoch_ari(train_config, weights: str, log=print) -> dict[str, float]:
    """Pseudo-label ARI per modality of the first epoch of ``train_config`` (a :class:`vireid_fast.config.Config`)
    started from ``weights``: training features extracted and clustered exactly as the trainer does."""
    import tempfile

    from ..data import INFRARED, MODALITIES
    from .metrics import adjusted_rand_index
    from .trainer import Trainer

    raw = train_config.to_dict()
    raw["model"]["pretrained"] = weights
    raw["eval"]["eval_untrained"] = False
    from ..config import from_dict

    with tempfile.TemporaryDirectory() as tmp:
        raw["experiment"]["output_dir"] = tmp
        trainer = Trainer(from_dict(raw), log=lambda *a, **k: None, progress=False)
        out = {}
        for m in MODALITIES:
            features = trainer.extract(trainer.train_sets[m], m)
            labels = trainer.cluster(features)
            truth = np.array([r.pid for r in trainer.train_sets[m].records])
            out[m] = adjusted_rand_index(truth, labels.numpy())
    log(f"first-epoch pseudo-label ARI: visible {out[MODALITIES[0]]:.3f}  infrared {out[INFRARED]:.3f}")
    return out
