"""The training engine: the epoch loop around a method plug-in (:mod:`vireid_fast.methods`).

Per epoch: ``method.start_epoch`` -> extract both training sets -> ``method.pseudo_label`` -> ``method.build_memories``
-> ``method.batch_sampler`` -> per iteration :meth:`Trainer.run_step` (``method.training_step``, one optimiser step,
EMA update, ``method.after_step``) -> ``method.end_epoch`` -> evaluate -> checkpoint. The engine owns the loop, data,
optimiser, checkpoints, evaluation and multi-process plumbing; the method owns its parameters, memories, association
and losses and sees the engine only through its :class:`~vireid_fast.methods.MethodContext`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch

from ..config import RESUMABLE_KEYS, flatten
from ..data import ImageDataset, TestTransform, TrainTransform
from ..methods import METHODS, Features, MethodContext, TrainBatch, count_clusters, get_method, jaccard_dbscan
from ..modality import INFRARED, MODALITIES, VISIBLE, Modality
from ..models import EMAEncoder, build_model, load_pretrained
from . import distributed
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, prepare_output_dir, save_checkpoint
from .data import build_test_set, open_dataset, resolve_root
from .metrics import (
    MetricsLog,
    adjusted_rand_index,
    cross_modality_pair_precision_recall,
    normalized_mutual_info,
    plot_curves,
    results_table,
)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# Top-level keys of checkpoint_payload that load() reads (a checkpoint lacking one is refused, naming it).
CHECKPOINT_KEYS = ("epoch", "config_hash", "method", "model", "optimizer", "scheduler", "method_state", "labels",
                   "rng", "history")
#: Per-epoch wall-time phases reported in every metrics row (``time/<phase>``), in order.
PHASES = ("extract", "cluster", "associate", "memory", "train", "eval")

__all__ = ["CHECKPOINT_NAME", "METHODS", "NonFiniteLossError", "PHASES", "TrainBatch", "Trainer"]


def build_encoder(model_config) -> torch.nn.Module:
    """The encoder a ``model:`` config section describes (random init; ``pretrained`` is loaded separately)."""
    m = model_config
    options = {} if m.arch == "agw_resnet50" else {"widths": tuple(m.widths)}
    return build_model(m.arch, non_local=m.non_local, last_stride=m.last_stride, gem_p=m.gem_p, **options)


class NonFiniteLossError(FloatingPointError):
    """The total loss of an iteration is NaN or infinite; training stops (the message names epoch, iteration and
    the loss terms)."""


class PhaseTimer:
    """``with timer("cluster"):`` adds the block's wall time to ``totals["cluster"]``; a nested phase pauses its
    parent, so each second is counted once."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, phase: str):
        now = time.perf_counter()
        if self._stack:
            parent = self._stack[-1]
            self.totals[parent[0]] += now - parent[1]
        self.totals.setdefault(phase, 0.0)
        self._stack.append([phase, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            name, start = self._stack.pop()
            self.totals[name] += end - start
            if self._stack:
                self._stack[-1][1] = end


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(
        np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


class Trainer:
    """Builds everything from a validated :class:`vireid_fast.config.Config` and trains with :meth:`fit`.

    data_root overrides ``data.root``; resume: a checkpoint path (or True for ``output_dir/checkpoint.pt``);
    log: the print function (only rank 0 prints); progress: progress bars (None = when the output is a terminal).
    """

    def __init__(self, config, data_root: str | None = None, resume: str | bool | None = None, log=print,
                 progress: bool | None = None):
        self.config = config
        self.progress = progress
        self._setup_process(log)
        self._setup_data(data_root)
        self._setup_model()
        self._setup_method()
        self._setup_optimizer()
        self.labels: dict[Modality, torch.Tensor] = {}
        self.start_epoch = 0
        self.metrics = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"))
        self.config_hash = config.hash()
        if resume:
            self.load(os.path.join(self.output_dir, CHECKPOINT_NAME) if resume is True else resume)
        elif self.is_main and os.path.exists(self.metrics.path):
            os.unlink(self.metrics.path)

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_process(self, log) -> None:
        exp = self.config.experiment
        want_cuda = exp.device == "cuda" or (exp.device == "auto" and torch.cuda.is_available())
        if exp.device == "cuda" and not torch.cuda.is_available():
            from ..config import ConfigError

            raise ConfigError("experiment.device: cuda, but no CUDA device is available; use experiment.device=cpu "
                              "(or auto)")
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if want_cuda else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = distributed.init_from_env(self.device)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        if exp.threads:
            torch.set_num_threads(exp.threads)
        self._seed_everything(exp.seed)
        if exp.deterministic and self.device.type == "cuda":
            # CPU kernels are already deterministic for a fixed thread count; on CUDA ask for deterministic
            # algorithms (this import is heavy, so it is not paid on CPU).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.output_dir = prepare_output_dir(exp.output_dir)

    def _setup_data(self, data_root: str | None) -> None:
        config = self.config
        self.root = resolve_root(config, data_root, self.log) if self.is_main else None
        if self.world > 1:  # rank 0 may have generated the synthetic set; everyone waits, then opens it
            torch.distributed.barrier()
            self.root = resolve_root(config, data_root, self.log)
        self.dataset = open_dataset(config, self.root)
        size, d = tuple(config.data.image_size), config.data
        images = {"size": size, "cache": d.cache_images, "max_pixels": d.max_image_pixels}
        self.train_sets = {
            VISIBLE: ImageDataset(self.dataset.train_visible, skip_bad_images=d.skip_bad_images, **images),
            INFRARED: ImageDataset(self.dataset.train_infrared, skip_bad_images=d.skip_bad_images, **images),
        }
        self.test_set = build_test_set(config, self.dataset, self.root)
        if d.skip_bad_images:
            self.test_set = self.test_set.without_bad_images(d.max_image_pixels, d.dataset, self.root)
        self.test_images = {"query": ImageDataset(self.test_set.query, **images),
                            "gallery": ImageDataset(self.test_set.gallery, **images)}
        self.skipped_images = [f for s in self.train_sets.values() for f in s.skipped] + self.test_set.skipped
        if self.skipped_images:
            self.log(f"skipped {len(self.skipped_images)} unreadable image(s) (data.skip_bad_images): "
                     + ", ".join(f"{p} ({r})" for p, r in self.skipped_images[:5])
                     + (f", ... (+{len(self.skipped_images) - 5} more)" if len(self.skipped_images) > 5 else ""))
        self.log(f"dataset {config.data.dataset} at {self.root}: {len(self.train_sets[VISIBLE])} visible + "
                 f"{len(self.train_sets[INFRARED])} infrared training images; test: {len(self.test_set.query)} "
                 f"query, {len(self.test_set.gallery)} gallery ({self.test_set.protocol} protocol)")
        t = config.train
        self.augment = TrainTransform(size, padding=t.padding, flip_p=t.flip_p, erasing_p=t.erasing_p,
                                      color_jitter=(0.4, 0.4, 0.4, 0.0) if t.color_jitter else None,
                                      seed=config.experiment.seed)
        self.augment_channel = TrainTransform(size, padding=t.padding, flip_p=t.flip_p, erasing_p=t.erasing_p,
                                              channel_augmentation="exchange", seed=config.experiment.seed + 1)
        self.test_transform = TestTransform(size)

    def _setup_model(self) -> None:
        m = self.config.model
        model = build_encoder(m)
        if m.pretrained:
            report = load_pretrained(model, m.pretrained, verbose=False, image_size=tuple(self.config.data.image_size),
                                     log=self.log)
            self.log(report.summary())
        self.encoder = model.to(self.device)
        self.model = self.encoder
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _setup_method(self) -> None:
        self.timer = PhaseTimer()
        self._values: dict[str, list[float]] = {}
        self.context = MethodContext(
            model=self.model, encoder=self.encoder, device=self.device, config=self.config,
            augment={"train": self.augment, "channel": self.augment_channel}, autocast=self.autocast,
            gather=self.gather, extract=self.extract_training_sets, log=self.log, log_value=self._log_value,
            timed=self.timer, backward_step=self.backward_step, ground_truth=self.ground_truth,
            images=self.training_images, rank=self.rank, world=self.world, seed=self.config.experiment.seed,
            restart_optimizer=self._setup_optimizer, cameras=self.training_cameras)
        self.method = get_method(self.config.method.name)(self.config.method, self.context).to(self.device)
        wants_ema = self.method.uses_ema or self.config.model.use_ema
        self.ema = (EMAEncoder(self.encoder, self.config.model.ema_beta, copy_buffers=self.method.ema_copies_buffers)
                    if wants_ema else None)
        self.context.ema = self.ema

    def _setup_optimizer(self) -> None:
        t, exp = self.config.train, self.config.experiment
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        params += [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=t.step_size, gamma=t.gamma)
        self.scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and exp.amp == "fp16") else None

    # ----------------------------------------------------------------------------------------------- utilities
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def autocast(self):
        amp = self.config.experiment.amp
        if self.device.type != "cuda" or amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather(x)

    def ground_truth(self) -> dict[Modality, np.ndarray]:
        """True identities of the training images per modality, (N,) int64 in dataset order (metrics and the
        supervised ceiling only)."""
        return {m: np.array([r.pid for r in self.train_sets[m].records], dtype=np.int64) for m in MODALITIES}

    def training_cameras(self, modality: Modality) -> np.ndarray:
        """(N,) int64 camera ids of the training images of ``modality``, in dataset order."""
        return np.array([r.camid for r in self.train_sets[Modality.parse(modality)].records], dtype=np.int64)

    def training_images(self, modality: Modality, indices) -> torch.Tensor:
        """uint8 (B, 3, H, W) training images of ``modality`` at dataset ``indices``, on the device."""
        dataset = self.train_sets[Modality.parse(modality)]
        return torch.stack([dataset[int(i)][0] for i in indices]).to(self.device)

    def _log_value(self, name: str, value) -> None:
        self._values.setdefault(name, []).append(float(value))

    def _loader(self, dataset, **kwargs):
        return torch.utils.data.DataLoader(dataset, num_workers=self.config.data.num_workers,
                                           persistent_workers=False, **kwargs)

    def _bar(self, iterable, total: int, desc: str):
        if not self.is_main or self.progress is False:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if self.progress is None else False)

    # ------------------------------------------------------------------------------------------- extraction
    @torch.no_grad()
    def embed_dataset(self, dataset: ImageDataset, modality: Modality, model: torch.nn.Module | None = None
                      ) -> dict[str, torch.Tensor]:
        """Named embeddings (:meth:`Method.embed`) of every image of ``dataset`` on the CPU, in dataset order: the
        image and its flip are summed, then :meth:`Method.finish_embeddings` (default: the method's
        ``normalized_embeddings`` L2-normalised). In multi-process runs
        each rank embeds a shard and the result is assembled on every rank."""
        model = self.encoder if model is None else model
        modality = Modality.parse(modality)
        was_training = model.training
        model.eval()
        indices = distributed.shard(len(dataset), self.rank, self.world)
        loader = self._loader(torch.utils.data.Subset(dataset, indices), batch_size=self.config.eval.batch_size,
                              shuffle=False)
        parts: dict[str, list[torch.Tensor]] = {}
        for images, _, _ in self._bar(loader, len(loader), f"extract {modality}"):
            x, x_flip = self.test_transform.views(images.to(self.device))
            with self.autocast():
                plain, flipped = self.method.embed(model, x, modality), self.method.embed(model, x_flip, modality)
            summed = {name: plain[name].float() + flipped[name].float() for name in plain}
            for name, f in self.method.finish_embeddings(summed).items():
                parts.setdefault(name, []).append(f)
        model.train(was_training)
        if not parts:  # an empty shard still has to take part in the assembly with the right shapes
            with torch.no_grad(), self.autocast():
                probe = self.method.embed(model.eval(), torch.zeros(1, 3, *self.config.data.image_size,
                                                                    device=self.device), modality)
            model.train(was_training)
            parts = {name: [v.float()[:0]] for name, v in probe.items()}
        return {name: distributed.assemble(torch.cat(chunks), indices, len(dataset)).cpu()
                for name, chunks in parts.items()}

    def extract(self, dataset: ImageDataset, modality: Modality, model: torch.nn.Module | None = None
                ) -> torch.Tensor:
        """(N, D) float32 features (the method's ``"feature"`` embedding) of ``dataset`` in dataset order."""
        return self.embed_dataset(dataset, modality, model)["feature"]

    def extract_training_sets(self, encoder: torch.nn.Module | None = None) -> Features:
        """Both training sets through :meth:`embed_dataset` (default encoder: ``method.feature_encoder()``)."""
        encoder = self.method.feature_encoder() if encoder is None else encoder
        return {m: self.embed_dataset(self.train_sets[m], m, encoder) for m in MODALITIES}

    # ------------------------------------------------------------------------------------------- clustering
    def cluster(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) int64 pseudo-labels (-1 = outlier) of one feature set with the config's Jaccard + DBSCAN."""
        c = self.config.cluster
        return jaccard_dbscan(features, k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples)

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, *, rerank: bool = False,
                 cmfp_k: int | None = None) -> dict:
        """Retrieval metrics (percent) averaged over the gallery trials: rank1, rank5, rank10, rank20, mAP, mINP.

        model: the encoder to evaluate (default ``method.eval_encoder()``). Distances: cosine (``-q . g``);
        ``cmfp_k``: SALCR's cross-modality feature propagation over [query; gallery] with k neighbours
        (:func:`vireid_fast.ops.cmfp_rerank`); ``rerank``: k-reciprocal re-ranking
        (:func:`vireid_fast.eval.kreciprocal`, k1=20, k2=6, lambda=0.3) of the Euclidean distances.
        """
        from ..eval import evaluate

        model = self.method.eval_encoder() if model is None else model
        query_modality = INFRARED if self._query_is_infrared() else VISIBLE
        q = self.extract(self.test_images["query"], query_modality, model)
        g = self.extract(self.test_images["gallery"], query_modality.other, model)
        qs, gs = self.test_set.query, self.test_set.gallery
        q_pids = np.array([r.pid for r in qs])
        q_cams = np.array([r.camid for r in qs])
        g_pids = np.array([r.pid for r in gs])
        g_cams = np.array([r.camid for r in gs])
        summaries = []
        self.last_results = []
        for chosen in self.test_set.gallery_trials:
            g_trial = g[torch.from_numpy(chosen)]
            if cmfp_k is not None:
                from ..ops import cmfp_rerank

                dist = cmfp_rerank(q, g_trial, cmfp_k)
            elif rerank:
                from ..eval import kreciprocal

                def euclid(a, b):
                    return (2.0 - 2.0 * (a @ b.T)).clamp(min=0).sqrt()

                dist = kreciprocal(euclid(q, g_trial), euclid(q, q), euclid(g_trial, g_trial))
            else:
                dist = -(q @ g_trial.T)
            result = evaluate(dist, q_pids, g_pids[chosen], q_cams, g_cams[chosen], protocol=self.test_set.protocol)
            self.last_results.append(result)
            summaries.append(result.summary())
        return {k: 100.0 * float(np.mean([s[k] for s in summaries])) for k in summaries[0]}

    def _query_is_infrared(self) -> bool:
        return all(r.modality == INFRARED for r in self.test_set.query)

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_payload(self, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "config_hash": self.config_hash,
            "config": self.config.to_dict(),
            "method": self.config.method.name, "model": self.encoder.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "method_state": self.method.state_dict(), "labels": {str(k): v.cpu() for k, v in self.labels.items()},
            "rng": _rng_state(), "history": self.metrics.rows,
        }

    def save(self, epoch: int) -> str | None:
        if not self.is_main:
            return None
        path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        save_checkpoint(path, self.checkpoint_payload(epoch))
        return path

    def load(self, path: str) -> None:
        state = load_checkpoint(path, required=CHECKPOINT_KEYS)
        if state.get("method") != self.config.method.name:
            raise CheckpointError(f"checkpoint {path} was trained with method {state.get('method')!r}, but this "
                                  f"config uses {self.config.method.name!r}; refusing to resume")
        if state.get("config_hash") != self.config_hash:
            old = flatten(state.get("config", {}))
            new = flatten(self.config.to_dict())
            changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
            raise CheckpointError(f"checkpoint {path} comes from another config (hash {state.get('config_hash')} vs "
                                  f"{self.config_hash}); differing keys: "
                                  + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:10])
                                  + "; refusing to resume")
        check_state_dict(self.encoder.state_dict(), state["model"], "model", path)
        self.encoder.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            check_state_dict(self.ema.module.state_dict(), state["ema"], "ema", path)
            self.ema.module.load_state_dict(state["ema"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict({k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                         for k, v in state["method_state"].items()})
            self.labels = {Modality.parse(k): v for k, v in state["labels"].items()}
            self.metrics.rows = list(state["history"])
            _set_rng_state(state["rng"])
            self.start_epoch = int(state["epoch"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as error:
            raise CheckpointError(f"checkpoint {path}: its training state does not fit this trainer "
                                  f"({type(error).__name__}: {error}); start a new run or use a checkpoint of this "
                                  "version") from error
        if self.is_main:
            self.metrics.rewrite()
        self.log(f"resumed from {path} after epoch {self.start_epoch}")

    # ------------------------------------------------------------------------------------------- training
    def backward_step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backward ``loss`` (scaled under fp16 autocast) and step the optimiser."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def prepare_epoch(self, epoch: int, row: dict) -> dict[Modality, object] | None:
        """Extraction, pseudo-labels, their quality against the truth (reported only), memories and the batch
        samplers of epoch ``epoch`` (None: no training this epoch)."""
        method = self.method
        with self.timer("extract"):
            features = self.extract_training_sets()
        with self.timer("cluster"):
            labels = method.pseudo_label(features)
            labels = {m: distributed.broadcast(labels[m].cpu().to(torch.int64).contiguous()) for m in MODALITIES}
        self.labels = labels
        truth = self.ground_truth()
        for m in MODALITIES:
            lab = labels[m].numpy()
            row[f"clusters/{m}"] = count_clusters(labels[m])
            row[f"outliers/{m}"] = int((lab < 0).sum())
            row[f"ari/{m}"] = adjusted_rand_index(truth[m], lab)
            row[f"nmi/{m}"] = normalized_mutual_info(truth[m], lab)
        with self.timer("memory"):
            method.build_memories(features, labels)
        for name, (space_v, space_r) in method.shared_label_spaces(labels).items():
            key = f"xmod/{name}/" if name else "xmod/"
            row[f"{key}precision"], row[f"{key}recall"] = cross_modality_pair_precision_recall(
                truth[VISIBLE], space_v.cpu().numpy(), truth[INFRARED], space_r.cpu().numpy())
        del features
        for m in MODALITIES:
            self.train_sets[m].set_labels(labels[m].numpy())
        return method.batch_sampler(labels, epoch)

    def run_step(self, epoch: int, iteration: int, batch: TrainBatch) -> dict[str, float]:
        """One iteration: the method's losses, a non-finite check, one optimiser step, the EMA update and
        ``method.after_step``; returns the loss values (and their total) as floats."""
        losses = self.method.training_step(batch)
        total = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total"] = float(total.detach())
        if not np.isfinite(values["total"]):
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items() if k != "total")
            raise NonFiniteLossError(
                f"epoch {epoch + 1}, iteration {iteration + 1}: the total loss is {values['total']} ({terms}); "
                "training stopped before the optimiser step — lower train.lr, check the method's loss weights, or "
                "resume from the last checkpoint with --resume")
        self.backward_step(total)
        if self.ema is not None:
            self.ema.update(self.encoder)
        self.method.after_step(iteration)
        return values

    def run_epoch(self, epoch: int) -> dict:
        """One epoch (0-based ``epoch``); returns its metrics row (without evaluation)."""
        cfg = self.config
        self.timer.totals = {}
        self._values = {}
        self.method.start_epoch(epoch)  # first: it may restart the optimiser (the row reports the lr trained with)
        row: dict = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        samplers = self.prepare_epoch(epoch, row)
        sums: dict[str, float] = {}
        with self.timer("train"):
            if samplers is not None:
                self.augment.reseed(cfg.experiment.seed * 1_000_003 + epoch)
                self.augment_channel.reseed(cfg.experiment.seed * 1_000_003 + epoch + 500_009)
                loaders = {m: self._loader(self.train_sets[m], batch_sampler=samplers[m]) for m in MODALITIES}
                self.model.train()
                self.method.train()
                steps = zip(loaders[VISIBLE], loaders[INFRARED], strict=True)
                for iteration, ((vi, vl, vx), (ii, il, ix)) in enumerate(
                        self._bar(steps, cfg.train.iters, f"epoch {epoch + 1}")):
                    batch = TrainBatch(vi.to(self.device), vl.to(self.device), vx, ii.to(self.device),
                                       il.to(self.device), ix)
                    for k, v in self.run_step(epoch, iteration, batch).items():
                        sums[k] = sums.get(k, 0.0) + v
            for module in (self.encoder, self.ema):
                if module is not None:
                    distributed.broadcast_buffers(module)
            row.update(self.method.end_epoch(epoch))
            self.scheduler.step()
        for k, v in sums.items():
            row[f"loss/{k}"] = v / cfg.train.iters
        for k, v in self._values.items():
            row[f"value/{k}"] = float(np.mean(v))
        row.update({f"time/{phase}": self.timer.totals.get(phase, 0.0) for phase in PHASES if phase != "eval"})
        # A method's own phases (nested ones pause their parent, so their seconds are nowhere else) are kept too.
        row.update({f"time/{phase}": seconds for phase, seconds in self.timer.totals.items() if phase not in PHASES})
        return row

    def fit(self) -> dict:
        """Train ``train.epochs`` epochs (from the resumed epoch); returns ``{"untrained": metrics, "trained": ...}``
        (metrics in percent; ``untrained`` only when evaluated in this run or recorded in the resumed history)."""
        cfg = self.config
        if self.start_epoch == 0 and cfg.eval.eval_untrained:
            t0 = time.perf_counter()
            result = self.evaluate()
            if self.is_main:
                self.metrics.append({"epoch": 0, **result, "time/eval": time.perf_counter() - t0})
            self.log(f"untrained: Rank-1 {result['rank1']:.2f}  mAP {result['mAP']:.2f}  mINP {result['mINP']:.2f}")
        final = None
        for epoch in range(self.start_epoch, cfg.train.epochs):
            row = self.run_epoch(epoch)
            done = epoch + 1
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.epochs:
                t0 = time.perf_counter()
                final = self.evaluate()
                row.update(final)
                row["time/eval"] = time.perf_counter() - t0
            else:
                row["time/eval"] = 0.0
            if self.is_main:
                self.metrics.append(row)
            self.log(self._epoch_line(row))
            self.save(done)
            if self.is_main:
                plot_curves(self.metrics.rows, os.path.join(self.output_dir, "curves.png"))
        self.plot_cmc()
        return self.summary()

    def plot_cmc(self) -> str | None:
        """PNG of the last evaluation's CMC curves (one per gallery trial) next to the metrics; None if unavailable."""
        results = getattr(self, "last_results", None)
        if not self.is_main or not results:
            return None
        try:
            from ..eval import plot_cmc
        except ImportError:
            return None
        path = os.path.join(self.output_dir, "cmc.png")
        try:
            return plot_cmc([(f"trial {i}", r) for i, r in enumerate(results)], path, title="CMC (last evaluation)")
        except ImportError:  # matplotlib missing
            return None

    def summary(self) -> dict:
        rows = self.metrics.rows
        out = {}
        untrained = [r for r in rows if r.get("epoch") == 0 and "mAP" in r]
        trained = [r for r in rows if r.get("epoch", 0) > 0 and "mAP" in r]
        keys = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
        if untrained:
            out["untrained"] = {k: untrained[-1][k] for k in keys}
        if trained:
            out["trained"] = {k: trained[-1][k] for k in keys}
            out["trained_epoch"] = trained[-1]["epoch"]
        return out

    @staticmethod
    def _epoch_line(row: dict) -> str:
        parts = [f"epoch {row['epoch']}"]
        losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss/"))
        if losses:
            parts.append(f"loss {losses}")
        for m in MODALITIES:
            parts.append(f"{m}: {row[f'clusters/{m}']} clusters, {row[f'outliers/{m}']} outliers, "
                         f"ARI {row[f'ari/{m}']:.3f} NMI {row[f'nmi/{m}']:.3f}")
        if "mAP" in row:
            parts.append(f"Rank-1 {row['rank1']:.2f} mAP {row['mAP']:.2f} mINP {row['mINP']:.2f}")
        if "xmod/precision" in row:
            parts.append(f"cross-modality pairs: precision {row['xmod/precision']:.3f} recall "
                         f"{row['xmod/recall']:.3f}")
        parts.append("time " + " ".join(f"{phase} {row.get(f'time/{phase}', 0.0):.1f}s" for phase in PHASES))
        return " | ".join(parts)

    def report(self) -> str:
        """The final results table and the per-epoch time split."""
        s = self.summary()
        rows = []
        if "untrained" in s:
            rows.append(("untrained", s["untrained"]))
        if "trained" in s:
            rows.append((f"trained (epoch {s['trained_epoch']})", s["trained"]))
        lines = [results_table(rows), "",
                 f"{'epoch':>5}" + "".join(f"{phase:>10}" for phase in PHASES) + "   "
                 f"{'clusters vis/ir':>16}{'outliers vis/ir':>17}{'ARI vis/ir':>14}{'NMI vis/ir':>14}"]
        for r in self.metrics.rows:
            if r.get("epoch", 0) > 0:
                lines.append(f"{r['epoch']:>5}" + "".join(f"{r.get(f'time/{phase}', 0.0):>9.1f}s" for phase in PHASES)
                             + "   "
                             f"{r['clusters/visible']:>9}/{r['clusters/infrared']:<6}"
                             f"{r['outliers/visible']:>10}/{r['outliers/infrared']:<6}"
                             f"{r['ari/visible']:>8.3f}/{r['ari/infrared']:<5.3f}"
                             f"{r['nmi/visible']:>8.3f}/{r['nmi/infrared']:<5.3f}")
        lines.append("(ARI/NMI: pseudo-labels against the true identities, outliers as singletons; reported only, "
                     "never used for training)")
        return "\n".join(lines)
