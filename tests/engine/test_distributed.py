"""Two gloo processes via torchrun on CPU: the first epoch's pseudo-labels equal the single-process run's, ranks
agree on the weights, and rank 0 alone writes the checkpoint and metrics."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from vireid_fast.engine import Trainer, load_checkpoint

from .tiny import TINY_OVERRIDES, tiny_config, tiny_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch single-process and the same epoch on two ranks (each rank's final encoder state in rank<r>.pt)."""
    root = tiny_root(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("ddp")
    single = Trainer(tiny_config(str(tmp / "single"), "train.epochs=1", "eval.eval_untrained=false"),
                     data_root=root, log=quiet, progress=False)
    untrained = {k: v.clone() for k, v in single.encoder.state_dict().items()}
    single.fit()

    out = tmp / "ddp"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(repo, "tests", "engine", "ddp_worker.py"), "train",
           "--data-root", root, "--no-progress", *TINY_OVERRIDES, f"experiment.output_dir={out}", "train.epochs=1",
           "eval.eval_untrained=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"single": single, "untrained": untrained, "out": out, "proc": proc, "ranks": ranks,
            "state": load_checkpoint(str(out / "checkpoint.pt"))}


def test_two_process_gloo_matches_single_process_labels(runs):
    state, single, out = runs["state"], runs["single"], runs["out"]
    for m in ("visible", "infrared"):
        assert torch.equal(state["labels"][m], single.labels[m]), m
    # rank 0 printed the epoch line and the table once
    assert runs["proc"].stdout.count("epoch 1 |") == 1
    assert len(open(out / "metrics.jsonl").read().splitlines()) == 1
    assert state["epoch"] == 1 and state["rng"] is not None


def test_ranks_agree_on_the_parameters(runs):
    """DDP averages the gradients, so every parameter is bit-identical on both ranks and equal to the checkpoint's;
    training moved most of them away from the (seeded, shared) initialisation."""
    rank0, rank1 = runs["ranks"]
    parameters = [name for name, _ in runs["single"].encoder.named_parameters()]
    assert parameters and set(parameters) <= set(rank0)
    for name in parameters:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], runs["state"]["model"][name]), name
    moved = [name for name in parameters if not torch.equal(rank0[name], runs["untrained"][name])]
    assert len(moved) > len(parameters) // 2, moved


def test_ranks_agree_on_the_batchnorm_statistics(runs):
    rank0, rank1 = runs["ranks"]
    buffers = [name for name, _ in runs["single"].encoder.named_buffers() if "running" in name]
    assert buffers
    differ = [name for name in buffers if not torch.equal(rank0[name], rank1[name])]
    assert not differ, differ
