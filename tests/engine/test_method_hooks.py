"""A fake method that uses every hook of the engine: its own trained parameters and resizable buffers, a
multi-entry ``embed``, joint pseudo-labels over both modalities, a custom paired sampler, the EMA encoder as feature
extractor, logged values, extra state — trained end to end and resumed bit-exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from vireid_fast.data import CrossModalityPairSampler
from vireid_fast.engine import Trainer, load_checkpoint
from vireid_fast.methods import METHODS, Method, cluster_means, jaccard_dbscan, register_method
from vireid_fast.modality import INFRARED, MODALITIES, VISIBLE
from vireid_fast.ops import memory_contrastive
from vireid_fast.schema import spec

from .tiny import assert_same_state, resume_after_kill, tiny_config, tiny_root


class _PairedView:
    """One modality's half of a CrossModalityPairSampler's batches (both halves replay the same seeded draw)."""

    def __init__(self, sampler: CrossModalityPairSampler, side: int):
        self.sampler, self.side = sampler, side

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for pair in self.sampler.pairs():
            yield pair[self.side]


class FakeHooks(Method):
    uses_ema = True
    shared_label_space = True
    normalized_embeddings = ("feature", "shallow")

    @dataclass
    class Params:
        name: str = spec("fake_hooks")
        temp: float = spec(0.1, min=0.0, min_exclusive=True)

    def __init__(self, params, context):
        super().__init__(params, context)
        dim = context.encoder.feature_dim
        self.head = nn.Linear(dim, dim)
        self.register_buffer("memory", None)
        self.steps_done = 0
        self.calls: list[str] = []
        self.embedded_with: set[int] = set()
        self.seen_features: dict = {}

    def get_extra_state(self):
        return {"steps_done": self.steps_done}

    def set_extra_state(self, state):
        self.steps_done = int(state["steps_done"])

    def start_epoch(self, epoch):
        self.calls.append(f"start_epoch {epoch}")

    def feature_encoder(self):
        self.calls.append("feature_encoder")
        return self.ctx.ema.module

    def embed(self, model, images, modality):
        self.embedded_with.add(id(model))
        out = model(images, modality, outputs=("stage3", "feature"))
        return {"feature": out["feature"], "shallow": out["stage3"].mean((2, 3))}

    def pseudo_label(self, features):
        self.calls.append("pseudo_label")
        self.seen_features = features
        joint = torch.cat([torch.cat([features[m]["feature"], features[m]["shallow"]], 1) for m in MODALITIES])
        joint = nn.functional.normalize(joint, dim=1)
        nv = features[VISIBLE]["feature"].shape[0]
        modality = torch.cat([torch.zeros(nv, dtype=torch.long),
                              torch.ones(joint.shape[0] - nv, dtype=torch.long)])
        c = self.ctx.config.cluster
        labels = jaccard_dbscan(joint, k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples, modality=modality)
        return {VISIBLE: labels[:nv], INFRARED: labels[nv:]}

    def build_memories(self, features, labels):
        self.calls.append("build_memories")
        feats = torch.cat([features[m]["feature"] for m in MODALITIES])
        self.memory = cluster_means(feats, torch.cat([labels[m] for m in MODALITIES])).to(self.ctx.device)

    def batch_sampler(self, labels, epoch):
        self.calls.append("batch_sampler")
        t = self.ctx.config.train
        sampler = CrossModalityPairSampler(labels[VISIBLE].numpy(), labels[INFRARED].numpy(), t.num_identities,
                                           t.num_instances, seed=self.ctx.seed, num_batches=t.iters)
        sampler.set_epoch(epoch)
        return {VISIBLE: _PairedView(sampler, 0), INFRARED: _PairedView(sampler, 1)}

    def training_step(self, batch):
        self.calls.append("training_step")
        assert torch.equal(batch.visible_labels, batch.infrared_labels), "the paired sampler pairs labels"
        ctx = self.ctx
        images = torch.cat([ctx.augment["train"](batch.visible_images), ctx.augment["train"](batch.infrared_images)])
        modality = torch.cat([torch.zeros(len(batch.visible_images)), torch.ones(len(batch.infrared_images))]).long()
        feats = self.head(ctx.model(images, modality))
        targets = torch.cat([batch.visible_labels, batch.infrared_labels])
        loss = memory_contrastive(feats, targets, self.memory, temp=self.params.temp, momentum=0.2)
        ctx.log_value("memory_rows", self.memory.shape[0])
        return {"joint": loss}

    def after_step(self, iteration):
        self.calls.append(f"after_step {iteration}")
        self.steps_done += 1

    def end_epoch(self, epoch):
        self.calls.append("end_epoch")
        return {"fake/steps_done": self.steps_done}

    def eval_encoder(self):
        self.calls.append("eval_encoder")
        return self.ctx.ema.module


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_method("fake_hooks")(FakeHooks)
    yield
    METHODS.pop("fake_hooks", None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_root(tmp_path_factory)


def quiet(*args, **kwargs):
    pass


OVERRIDES = ("method.name=fake_hooks", "model.ema_beta=0.5", "cluster.eps=0.8", "eval.eval_untrained=false")


def test_every_hook_runs_trains_and_checkpoints(root, tmp_path):
    trainer = Trainer(tiny_config(str(tmp_path / "run"), "train.epochs=1", *OVERRIDES), data_root=root, log=quiet,
                      progress=False)
    method = trainer.method
    head_before = method.head.weight.detach().clone()
    assert any(p is method.head.weight for group in trainer.optimizer.param_groups for p in group["params"])
    trainer.fit()
    iters = trainer.config.train.iters
    expected = ["start_epoch 0", "feature_encoder", "pseudo_label", "build_memories", "batch_sampler"]
    for i in range(iters):
        expected += ["training_step", f"after_step {i}"]
    expected += ["end_epoch", "eval_encoder"]
    assert method.calls == expected
    # the EMA encoder, not the trained one, embedded the training and test sets
    assert method.embedded_with == {id(trainer.ema.module)}
    # two named embeddings, both L2-normalised as declared
    for m in MODALITIES:
        n = len(trainer.train_sets[m])
        assert method.seen_features[m]["feature"].shape == (n, trainer.encoder.feature_dim)
        assert method.seen_features[m]["shallow"].shape == (n, 16)  # stage-3 width of the tiny model
        for name in ("feature", "shallow"):
            torch.testing.assert_close(method.seen_features[m][name].norm(dim=1), torch.ones(n))
    # the method's own parameters trained; its buffer, parameters and extra state are in the checkpoint
    assert not torch.equal(method.head.weight, head_before)
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert {"head.weight", "head.bias", "memory", "_extra_state"} <= set(state["method_state"])
    assert state["method_state"]["_extra_state"] == {"steps_done": iters}
    row = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert row["fake/steps_done"] == iters
    assert row["value/memory_rows"] == method.memory.shape[0]
    assert row["clusters/visible"] == len(np.unique(trainer.labels[VISIBLE][trainer.labels[VISIBLE] >= 0]))
    assert 0.0 <= row["xmod/precision"] <= 1.0 and 0.0 <= row["xmod/recall"] <= 1.0
    for phase in ("extract", "cluster", "memory", "train", "eval"):
        assert row[f"time/{phase}"] >= 0.0


def test_resume_is_bit_exact(root, tmp_path, monkeypatch):
    full = Trainer(tiny_config(str(tmp_path / "full"), "train.epochs=2", *OVERRIDES), data_root=root, log=quiet,
                   progress=False)
    full.fit()

    resumed = resume_after_kill(root, str(tmp_path / "killed"), ("train.epochs=2", *OVERRIDES), 1, monkeypatch, quiet)
    assert resumed.method.memory is not None and resumed.method.steps_done == full.config.train.iters
    resumed.fit()
    assert_same_state((full.encoder, resumed.encoder), (full.ema.module, resumed.ema.module),
                      (full.method, resumed.method))
    for m in MODALITIES:
        assert torch.equal(full.labels[m], resumed.labels[m])
