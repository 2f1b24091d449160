"""The training engine: per epoch extract -> cluster per modality -> associate -> memories -> train -> evaluate ->
checkpoint, with the method plug-in (:mod:`vireid_fast.methods`) supplying association, memories and losses."""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import INFRARED, MODALITIES, VISIBLE, IdentityBalancedSampler, ImageDataset, TestTransform, TrainTransform
from ..methods import get_method
from ..models import EMAEncoder, build_model, load_pretrained
from . import distributed
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, prepare_output_dir, save_checkpoint
from .data import build_test_set, open_dataset, resolve_root
from .metrics import MetricsLog, adjusted_rand_index, normalized_mutual_info, plot_curves, results_table

MODALITY_CODE = {VISIBLE: 0, INFRARED: 1}
CHECKPOINT_NAME = "checkpoint.pt"
# Top-level keys of checkpoint_payload that load() reads (a checkpoint lacking one is refused, naming it).
CHECKPOINT_KEYS = ("epoch", "config_hash", "method", "model", "optimizer", "scheduler", "method_state", "labels",
                   "rng", "history")


@dataclass
class TrainBatch:
    """One iteration's data: uint8 images (B, 3, H, W) on the device, int64 pseudo-labels (B,), dataset indices."""

    visible_images: torch.Tensor
    visible_labels: torch.Tensor
    visible_indices: torch.Tensor
    infrared_images: torch.Tensor
    infrared_labels: torch.Tensor
    infrared_indices: torch.Tensor


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
    log: the print function (only rank 0 prints).
    """

    def __init__(self, config, data_root: str | None = None, resume: str | bool | None = None, log=print,
                 progress: bool | None = None):
        self.config = config
        exp = config.experiment
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
        self.progress = progress
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

        self.root = resolve_root(config, data_root, self.log) if self.is_main else None
        if self.world > 1:  # rank 0 may have generated the synthetic set; everyone waits, then opens it
            torch.distributed.barrier()
            self.root = resolve_root(config, data_root, self.log)
        self.dataset = open_dataset(config, self.root)
        size, d = tuple(config.data.image_size), config.data
        images = {"size": size, "cache": d.cache_images, "max_pixels": d.max_image_pixels}
        self.train_sets = {m: ImageDataset(getattr(self.dataset, f"train_{m}"), skip_bad_images=d.skip_bad_images,
                                           **images) for m in (VISIBLE, INFRARED)}
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

        m = config.model
        if m.arch == "agw_resnet50":
            model = build_model(m.arch, non_local=m.non_local, last_stride=m.last_stride, gem_p=m.gem_p)
        else:
            model = build_model(m.arch, widths=tuple(m.widths), non_local=m.non_local, last_stride=m.last_stride,
                                gem_p=m.gem_p)
        if m.pretrained:
            report = load_pretrained(model, m.pretrained, verbose=False)
            self.log(report.summary())
        self.encoder = model.to(self.device)
        self.model = self.encoder
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ema = EMAEncoder(self.encoder, m.ema_beta) if m.use_ema else None

        t = config.train
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=t.step_size, gamma=t.gamma)
        self.scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and exp.amp == "fp16") else None

        self.augment = TrainTransform(size, padding=t.padding, flip_p=t.flip_p, erasing_p=t.erasing_p,
                                      color_jitter=(0.4, 0.4, 0.4, 0.0) if t.color_jitter else None, seed=exp.seed)
        self.augment_channel = TrainTransform(size, padding=t.padding, flip_p=t.flip_p, erasing_p=t.erasing_p,
                                              channel_augmentation="exchange", seed=exp.seed + 1)
        self.test_transform = TestTransform(size)

        self.method = get_method(config.method.name)(config.method, self)
        self.labels: dict[str, torch.Tensor] = {}
        self.start_epoch = 0
        self.metrics = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"))
        self.config_hash = config.hash()
        if resume:
            path = os.path.join(self.output_dir, CHECKPOINT_NAME) if resume is True else resume
            self.load(path)
        elif self.is_main and os.path.exists(self.metrics.path):
            os.unlink(self.metrics.path)

    # ----------------------------------------------------------------------------------------------- utilities
    def _seed_everything(self, seed: int) -> None:
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
    def extract(self, dataset: ImageDataset, modality: str, model: torch.nn.Module | None = None) -> torch.Tensor:
        """(N, D) float32 L2-normalised features of ``dataset`` (average over the image and its flip), in dataset
        order; in multi-process runs each rank extracts a shard and the result is assembled on every rank."""
        model = self.encoder if model is None else model
        was_training = model.training
        model.eval()
        indices = distributed.shard(len(dataset), self.rank, self.world)
        loader = self._loader(torch.utils.data.Subset(dataset, indices), batch_size=self.config.eval.batch_size,
                              shuffle=False)
        parts = []
        code = MODALITY_CODE[modality]
        for images, _, _ in self._bar(loader, len(loader), f"extract {modality}"):
            x, x_flip = self.test_transform.views(images.to(self.device))
            with self.autocast():
                f = model(x, code).float() + model(x_flip, code).float()
            parts.append(torch.nn.functional.normalize(f, dim=1))
        dim = self.encoder.feature_dim
        local = torch.cat(parts) if parts else torch.empty(0, dim, device=self.device)
        model.train(was_training)
        return distributed.assemble(local, indices, len(dataset)).cpu()

    # ------------------------------------------------------------------------------------------- clustering
    def cluster(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) int64 pseudo-labels (-1 = outlier) from k-reciprocal Jaccard + DBSCAN (rank 0, then broadcast)."""
        from ..ops import dbscan, kreciprocal_jaccard

        c = self.config.cluster
        n = features.shape[0]
        labels = torch.full((n,), -1, dtype=torch.int64)
        if self.is_main and n > 1:
            k1 = min(c.k1, n - 1)
            dist = kreciprocal_jaccard(features, k1=k1, k2=min(c.k2, k1), sparse=True)
            labels = dbscan(dist, c.eps, c.min_samples).cpu()
        return distributed.broadcast(labels)

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, *, rerank: bool = False,
                 cmfp_k: int | None = None) -> dict:
        """Retrieval metrics (percent) averaged over the gallery trials: rank1, rank5, rank10, rank20, mAP, mINP.

        Distances: cosine (``-q . g``); ``cmfp_k``: SALCR's cross-modality feature propagation over [query; gallery]
        with k neighbours (:func:`vireid_fast.ops.cmfp_rerank`); ``rerank``: k-reciprocal re-ranking
        (:func:`vireid_fast.eval.kreciprocal`, k1=20, k2=6, lambda=0.3) of the Euclidean distances.
        """
        from ..eval import evaluate

        q = self.extract(self.test_images["query"], INFRARED if self._query_is_infrared() else VISIBLE, model)
        g = self.extract(self.test_images["gallery"], VISIBLE if self._query_is_infrared() else INFRARED, model)
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
            "format": 1, "epoch": epoch, "config_hash": self.config_hash, "config": self.config.to_dict(),
            "method": self.config.method.name, "model": self.encoder.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "method_state": self.method.state(), "labels": {k: v.cpu() for k, v in self.labels.items()},
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
            from ..config import RESUMABLE_KEYS, flatten

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
            self.method.load_state(state["method_state"])
            self.labels = dict(state["labels"])
            self.metrics.rows = list(state["history"])
            _set_rng_state(state["rng"])
            self.start_epoch = int(state["epoch"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path}: its training state does not fit this trainer "
                                  f"({type(error).__name__}: {error}); start a new run or use a checkpoint of this "
                                  "version") from error
        if self.is_main:
            self.metrics.rewrite()
        self.log(f"resumed from {path} after epoch {self.start_epoch}")

    # ------------------------------------------------------------------------------------------- training
    def run_epoch(self, epoch: int) -> dict:
        """One epoch (0-based ``epoch``); returns its metrics row (without evaluation)."""
        cfg = self.config
        row: dict = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        self.method.start_epoch(epoch)
        t0 = time.perf_counter()
        features = {m: self.extract(self.train_sets[m], m) for m in MODALITIES}
        t1 = time.perf_counter()
        labels = {m: self.cluster(features[m]) for m in MODALITIES}
        labels = self.method.associate(features, labels)
        self.labels = labels
        for m in MODALITIES:
            lab = labels[m].numpy()
            truth = np.array([r.pid for r in self.train_sets[m].records])
            row[f"clusters/{m}"] = int(lab.max()) + 1 if (lab >= 0).any() else 0
            row[f"outliers/{m}"] = int((lab < 0).sum())
            row[f"ari/{m}"] = adjusted_rand_index(truth, lab)
            row[f"nmi/{m}"] = normalized_mutual_info(truth, lab)
        self.method.build_memories(features, labels)
        t2 = time.perf_counter()

        samplers = {}
        for m in MODALITIES:
            self.train_sets[m].set_labels(labels[m].numpy())
            clusters = row[f"clusters/{m}"]
            if clusters == 0:
                self.log(f"epoch {epoch + 1}: no {m} clusters (all outliers); skipping training this epoch — "
                         "raise cluster.eps or lower cluster.min_samples")
                samplers = None
                break
            p = min(cfg.train.num_identities, clusters)
            samplers[m] = IdentityBalancedSampler(labels[m].numpy(), p, cfg.train.num_instances,
                                                  seed=cfg.experiment.seed * 7919 + MODALITY_CODE[m] + 2 * self.rank,
                                                  num_batches=cfg.train.iters)
            samplers[m].set_epoch(epoch)
        sums: dict[str, float] = {}
        if samplers is not None:
            self.augment.reseed(cfg.experiment.seed * 1_000_003 + epoch)
            self.augment_channel.reseed(cfg.experiment.seed * 1_000_003 + epoch + 500_009)
            loaders = {m: self._loader(self.train_sets[m], batch_sampler=samplers[m]) for m in MODALITIES}
            self.model.train()
            steps = zip(loaders[VISIBLE], loaders[INFRARED], strict=True)
            for (vi, vl, vx), (ii, il, ix) in self._bar(steps, cfg.train.iters, f"epoch {epoch + 1}"):
                batch = TrainBatch(vi.to(self.device), vl.to(self.device), vx, ii.to(self.device),
                                   il.to(self.device), ix)
                losses = self.method.training_step(batch)
                total = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(total).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    total.backward()
                    self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.encoder)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["total"] = sums.get("total", 0.0) + float(total.detach())
        self.scheduler.step()
        t3 = time.perf_counter()
        for k, v in sums.items():
            row[f"loss/{k}"] = v / cfg.train.iters
        row.update({"time/extract": t1 - t0, "time/cluster": t2 - t1, "time/train": t3 - t2})
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
        parts.append("time extract {:.1f}s cluster {:.1f}s train {:.1f}s eval {:.1f}s".format(
            row["time/extract"], row["time/cluster"], row["time/train"], row["time/eval"]))
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
                 f"{'epoch':>5}{'extract':>10}{'cluster':>10}{'train':>10}{'eval':>10}   "
                 f"{'clusters vis/ir':>16}{'outliers vis/ir':>17}{'ARI vis/ir':>14}{'NMI vis/ir':>14}"]
        for r in self.metrics.rows:
            if r.get("epoch", 0) > 0:
                lines.append(f"{r['epoch']:>5}{r['time/extract']:>9.1f}s{r['time/cluster']:>9.1f}s"
                             f"{r['time/train']:>9.1f}s{r['time/eval']:>9.1f}s   "
                             f"{r['clusters/visible']:>9}/{r['clusters/infrared']:<6}"
                             f"{r['outliers/visible']:>10}/{r['outliers/infrared']:<6}"
                             f"{r['ari/visible']:>8.3f}/{r['ari/infrared']:<5.3f}"
                             f"{r['nmi/visible']:>8.3f}/{r['nmi/infrared']:<5.3f}")
        lines.append("(ARI/NMI: pseudo-labels against the true identities, outliers as singletons; reported only, "
                     "never used for training)")
        return "\n".join(lines)
