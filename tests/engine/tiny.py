"""A tiny synthetic dataset and config for fast engine tests (generated once per session)."""

from __future__ import annotations

import os

TINY_OVERRIDES = [
    "data.dataset=synthetic", "data.image_size=[32, 16]", "data.cache_images=true",
    "model.arch=small_resnet", "model.widths=[8, 16, 16, 32]", "model.non_local=false", "model.pretrained=",
    "cluster.eps=0.7", "cluster.min_samples=2", "cluster.k1=6", "cluster.k2=2",
    "train.iters=2", "train.num_identities=2", "train.num_instances=2", "train.eval_every=1",
    "train.padding=2", "eval.batch_size=64", "eval.trials=1", "experiment.deterministic=true",
    "experiment.threads=1",
]


def tiny_root(tmp_path_factory) -> str:
    """The tiny synthetic set (24 identities, 32x16 images) shared by the whole test session."""
    from vireid_fast.data.synthetic import generate

    base = tmp_path_factory.getbasetemp()
    root = os.path.join(str(base), "tiny_synthetic")
    if not os.path.isfile(os.path.join(root, "synthetic.json")):
        generate(root, size="tiny", seed=0, image_size=(32, 16), workers=1)
    return root


def tiny_config(output_dir: str, *extra: str):
    from vireid_fast.config import load_config

    return load_config(None, TINY_OVERRIDES + [f"experiment.output_dir={output_dir}", *extra])


def kill_during_epoch(trainer, epoch: int, monkeypatch) -> None:
    """Run ``trainer.fit()`` until it is killed (KeyboardInterrupt) at the start of 0-based ``epoch``, after the
    checkpoint of the epoch before; restores ``Trainer.run_epoch`` afterwards."""
    import pytest

    from vireid_fast.engine import Trainer

    original = Trainer.run_epoch

    def die(self, current):
        if current == epoch:
            raise KeyboardInterrupt("killed")
        return original(self, current)

    monkeypatch.setattr(Trainer, "run_epoch", die)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Trainer, "run_epoch", original)


def resume_after_kill(root: str, output_dir: str, overrides, kill_epoch: int, monkeypatch, log):
    """A Trainer of ``tiny_config(output_dir, *overrides)`` resumed from the checkpoint of a run killed at the start
    of 0-based ``kill_epoch`` (not yet fitted). The global generator is reseeded first: the resumed run must owe
    nothing to it."""
    import torch

    from vireid_fast.engine import Trainer

    killed = Trainer(tiny_config(output_dir, *overrides), data_root=root, log=log, progress=False)
    kill_during_epoch(killed, kill_epoch, monkeypatch)
    torch.manual_seed(999)
    return Trainer(tiny_config(output_dir, *overrides), data_root=root, log=log, progress=False, resume=True)


def assert_same_state(*pairs) -> None:
    """Each (a, b) pair of modules has the same state_dict keys and bit-identical entries (tensors, and the tensors
    inside extra state: dicts, lists and tuples compared element by element)."""
    import torch

    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            assert type(x) is type(y) and len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            same(sa[key], sb[key], key)
