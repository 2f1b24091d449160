"""Two gloo processes via torchrun on CPU: the first epoch's pseudo-labels equal the single-process run's, ranks
agree on the weights, and rank 0 alone writes the checkpoint and metrics."""

import os
import socket
import subprocess
import sys

import torch

from vireid_fast.engine import Trainer, load_checkpoint

from .tiny import TINY_OVERRIDES, tiny_config, tiny_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process_labels(tmp_path_factory, tmp_path):
    root = tiny_root(tmp_path_factory)
    single = Trainer(tiny_config(str(tmp_path / "single"), "train.epochs=1", "eval.eval_untrained=false"),
                     data_root=root, log=lambda *a, **k: None, progress=False)
    single.fit()

    out = tmp_path / "ddp"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "vireid_fast.cli", "train", "--data-root", root,
           "--no-progress", *TINY_OVERRIDES, f"experiment.output_dir={out}", "train.epochs=1",
           "eval.eval_untrained=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = load_checkpoint(str(out / "checkpoint.pt"))
    for m in ("visible", "infrared"):
        assert torch.equal(state["labels"][m], single.labels[m]), m
    # rank 0 printed the epoch line and the table once
    assert proc.stdout.count("epoch 1 |") == 1
    assert len(open(out / "metrics.jsonl").read().splitlines()) == 1
    assert state["epoch"] == 1 and state["rng"] is not None
