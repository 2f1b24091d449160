"""A MethodContext for unit tests of a method outside the engine (CPU, one process, deterministic augmentation)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from vireid_fast.methods import MethodContext


def make_context(model, config=None, truth=None, **overrides) -> MethodContext:
    """Context around ``model``: "train" augmentation = scale to [0, 1], "channel" = grey copy; gather = identity."""
    from vireid_fast.config import load_config

    values: dict = {}
    fields = dict(
        model=model, encoder=model, device=torch.device("cpu"), config=config or load_config(None),
        augment={"train": lambda images: images.float() / 255,
                 "channel": lambda images: images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1) / 255},
        autocast=contextlib.nullcontext, gather=lambda x: x,
        extract=lambda encoder=None: (_ for _ in ()).throw(AssertionError("extract is not available here")),
        log=lambda *a, **k: None, log_value=lambda name, value: values.setdefault(name, []).append(float(value)),
        timed=lambda phase: contextlib.nullcontext(),
        backward_step=lambda loss: loss.backward(),
        ground_truth=lambda: {m: np.asarray(t) for m, t in (truth or {}).items()},
        restart_optimizer=lambda: None,
    )
    fields.update(overrides)
    context = MethodContext(**fields)
    context.logged_values = values
    return context
