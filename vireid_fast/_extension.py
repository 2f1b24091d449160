"""Defensive loading of the compiled extension ``vireid_fast._C``.

The extension holds the op schemas and the C++ CPU kernels. It is optional at import time: when it is missing, fails
to load, or was built for another torch, the ops fall back to their pure-PyTorch references and one warning says how to
rebuild.
"""

from __future__ import annotations

import glob
import os
import re
import warnings

import torch

REBUILD_HINT = "rebuild it with `pip install -e . --no-build-isolation` (or `make build`) in the vireid_fast checkout"

_state: dict[str, object] = {"tried": False, "loaded": False, "path": None, "reason": "not loaded yet"}


def _library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C.*.so")) + glob.glob(os.path.join(here, "_C.*.pyd")))
    return candidates[0] if candidates else None


def _built_for(path: str) -> str | None:
    with open(path, "rb") as fh:
        match = re.search(rb"VIREID_TORCH_VERSION=([^;\x00]+);", fh.read())
    return match.group(1).decode() if match else None


def load() -> bool:
    """Load the extension once; return whether its kernels are registered."""
    if _state["tried"]:
        return bool(_state["loaded"])
    _state["tried"] = True
    path = _library_path()
    if os.environ.get("VIREID_DISABLE_EXTENSION") == "1":
        _state["reason"] = "disabled by VIREID_DISABLE_EXTENSION=1"
    elif path is None:
        _state["reason"] = f"the compiled extension vireid_fast._C was not found; {REBUILD_HINT}"
    else:
        built = _built_for(path)
        if built != torch.__version__:
            _state["reason"] = (f"{os.path.basename(path)} was built for torch {built or 'unknown'} but torch "
                                f"{torch.__version__} is installed; {REBUILD_HINT}")
        else:
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError) as exc:
                _state["reason"] = f"{os.path.basename(path)} failed to load ({exc}); {REBUILD_HINT}"
            else:
                _state.update(loaded=True, path=path, reason="loaded")
    if not _state["loaded"]:
        warnings.warn(f"vireid_fast: C++ kernels unavailable, using the PyTorch reference ops: {_state['reason']}",
                      RuntimeWarning, stacklevel=3)
    return bool(_state["loaded"])


def status() -> tuple[bool, str]:
    load()
    return bool(_state["loaded"]), str(_state["reason"])
