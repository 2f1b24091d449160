"""Test-session set-up: Triton kernels run in the interpreter when there is no GPU (must precede any triton import)."""

import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_DIR = os.environ.get("VIREID_GOLDEN_DIR", os.path.join(os.path.dirname(__file__), "golden"))


@pytest.fixture
def golden():
    """Load a golden .npz from tests/golden (the community code's outputs); a missing file fails the test."""
    import numpy as np

    def load(name: str):
        path = os.path.join(GOLDEN_DIR, name)
        if not os.path.exists(path):
            pytest.fail(f"golden file {path} not found: the goldens ship in tests/golden (restore them from git, or "
                        "point VIREID_GOLDEN_DIR at a copy)")
        return np.load(path)

    return load


@pytest.fixture
def backend(monkeypatch):
    """Force VIREID_BACKEND for one test: ``backend("cpp")``."""

    def use(name: str) -> None:
        if name == "cpp":
            from vireid_fast import _extension

            loaded, reason = _extension.status()
            if not loaded:  # the fallback configuration (VIREID_DISABLE_EXTENSION=1 or no build): nothing to compare
                pytest.skip(f"needs the compiled extension: {reason}")
        monkeypatch.setenv("VIREID_BACKEND", name)

    return use
