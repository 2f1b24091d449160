"""How every vireid op is registered and dispatched.

Each op ``vireid::<name>`` is one ``torch.library`` operator:

* schema — declared in ``csrc/schemas.cpp``; defined from :data:`_schemas.SCHEMAS` when the extension is missing;
* CPU kernel — C++ (``TORCH_LIBRARY_IMPL(vireid, CPU)``), or the reference when the extension is missing;
* CUDA kernel — the op's Triton launcher (``kernels/<name>.py``), or the reference when Triton is missing;
* any other device — the pure-PyTorch reference (``CompositeExplicitAutograd``);
* fake (meta) kernel — for ``torch.compile`` and ``opcheck``.

The public functions call :func:`choose_backend`, which honours ``VIREID_BACKEND=reference|cpp|triton``: an explicit
choice that cannot run raises :class:`BackendUnavailableError` saying how to fix it; the automatic choice falls back
with one warning per process.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable

import torch

from .. import _extension
from ._schemas import SCHEMAS

BACKENDS = ("reference", "cpp", "triton")
_TRITON_FREE: set[str] = set()  # ops whose CUDA route does not use Triton

_python_lib: torch.library.Library | None = None
_impl_lib = torch.library.Library("vireid", "IMPL")  # noqa: TOR901 - kept alive for the process
_registered: set[str] = set()
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); pip install 'triton>=3.7'"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device; set TRITON_INTERPRET=1 (before importing vireid_fast) to run kernels on CPU"
    return True, "available" if torch.cuda.is_available() else "available in the interpreter (TRITON_INTERPRET=1)"


def requested_backend() -> str | None:
    value = os.environ.get("VIREID_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"VIREID_BACKEND must be one of {', '.join(BACKENDS)} or auto, got {value!r}")
    return value


def choose_backend(op: str, device: torch.device) -> str:
    """Return ``"cpp"``, ``"triton"`` or ``"reference"`` for running ``op`` on ``device``."""
    forced = requested_backend()
    if forced == "reference":
        return "reference"
    if forced == "cpp":
        loaded, reason = _extension.status()
        if device.type != "cpu":
            raise BackendUnavailableError(f"VIREID_BACKEND=cpp runs CPU tensors only, got {device}; "
                                          "move the inputs to the CPU or choose VIREID_BACKEND=triton")
        if not loaded:
            raise BackendUnavailableError(f"VIREID_BACKEND=cpp but {reason}")
        return "cpp"
    if forced == "triton":
        ok, reason = triton_status()
        if not ok:
            raise BackendUnavailableError(f"VIREID_BACKEND=triton but {reason}")
        return "triton"
    if device.type == "cpu":
        return "cpp" if _extension.status()[0] else "reference"  # the loader already warned once
    if device.type == "cuda":
        if op in _TRITON_FREE:  # its kernels/ module is plain torch (or a host copy): no Triton needed
            return "triton"
        ok, reason = triton_status()
        if ok:
            return "triton"
        warn_once(f"triton:{op}", f"vireid_fast: Triton unavailable ({reason}); {op} on CUDA uses the reference")
    return "reference"


def triton_module(op: str):
    """The Triton kernel module of ``op`` (``vireid_fast.kernels.<op>``)."""
    return importlib.import_module(f"vireid_fast.kernels.{op}")


def cpp_loaded() -> bool:
    """Whether the compiled CPU kernels are registered (the CPU kernel of each op then calls ``_<op>_cpu``)."""
    return _extension.status()[0]


def dispatched_backend(device: torch.device) -> str:
    """The backend ``torch.ops.vireid.<op>`` runs for tensors on ``device`` (the dispatcher's choice)."""
    if device.type == "cpu":
        return "cpp" if cpp_loaded() else "reference"
    return "triton" if device.type == "cuda" else "reference"


def checked(op: str, kernel: Callable) -> Callable:
    """``kernel`` behind the op's validation layer (the check before it, the post-check after it)."""
    check, after = _checks[op]

    def run(*args):
        check(*args)
        out = kernel(*args)
        if after is not None:
            after(args, out)
        return out

    run.__name__ = f"{op}_{getattr(kernel, '__name__', 'kernel')}_checked"
    return run


def run(op: str, backend: str, device: torch.device, *args):
    """Run ``op`` on ``backend`` (from :func:`choose_backend`): through ``torch.ops.vireid.<op>`` when the dispatcher
    would choose that backend anyway (traceable, and the only route under ``torch.compile``), else the backend's
    checked kernel directly (a forced reference on CPU, or Triton's interpreter on CPU tensors)."""
    if backend == dispatched_backend(device):
        return getattr(torch.ops.vireid, op)(*args)
    if backend == "triton":
        return checked(op, getattr(triton_module(_kernel_modules[op][0]), _kernel_modules[op][1]))(*args)
    return checked(op, _references[op])(*args)


_checks: dict[str, tuple[Callable, Callable | None]] = {}
_references: dict[str, Callable] = {}
_kernel_modules: dict[str, tuple[str, str]] = {}


def register(op: str, *, reference: Callable, fake: Callable, check: Callable, after: Callable | None = None,
             kernel_module: str | None = None, launcher: str = "launch", needs_triton: bool = True,
             cpu_wrapper: Callable[[Callable], Callable] | None = None) -> None:
    """Register the Python-side kernels of ``vireid::<op>`` (idempotent), each behind ``check``.

    ``check`` takes the op's schema arguments and raises ``ValueError``/``TypeError`` (see ``_checks``); it runs in
    front of every kernel: the CPU kernel (calling the compiled ``vireid::_<op>_cpu``), the CUDA kernel, the reference
    and the fake kernel (where only its shape/dtype part applies). ``after(args, outputs)`` may inspect the outputs.
    ``reference`` serves every device without a dedicated kernel. CUDA tensors go to
    ``vireid_fast.kernels.<kernel_module or op>.<launcher>`` (same arguments) when Triton is importable, or always
    when ``needs_triton`` is False (modules written in torch ops or routing to a host copy). ``cpu_wrapper(kernel)``,
    if given, wraps the compiled CPU kernel (e.g. to repair a result the kernel cannot represent).
    """
    global _python_lib
    if op in _registered:
        return
    _registered.add(op)
    _checks[op] = (check, after)
    _references[op] = reference
    _kernel_modules[op] = (kernel_module or op, launcher)
    if not _extension.load():
        if _python_lib is None:
            _python_lib = torch.library.Library("vireid", "DEF")  # noqa: TOR901
        _python_lib.define(SCHEMAS[op])
    else:
        cpu_kernel = getattr(torch.ops.vireid, f"_{op}_cpu")
        _impl_lib.impl(op, checked(op, cpu_kernel if cpu_wrapper is None else cpu_wrapper(cpu_kernel)), "CPU")
    _impl_lib.impl(op, checked(op, reference), "CompositeExplicitAutograd")
    if not needs_triton:
        _TRITON_FREE.add(op)

    def cuda_kernel(*args):
        ok, reason = (True, "") if not needs_triton else triton_status()
        if not ok:
            warn_once(f"triton:{op}", f"vireid_fast: Triton unavailable ({reason}); {op} on CUDA uses the reference")
            return reference(*args)
        return getattr(triton_module(kernel_module or op), launcher)(*args)

    _impl_lib.impl(op, checked(op, cuda_kernel), "CUDA")

    @functools.wraps(fake)
    def fake_kernel(*args):
        check(*args)  # shapes, dtypes and scalars; value checks skip fake tensors
        return fake(*args)

    torch.library.register_fake(f"vireid::{op}")(fake_kernel)
