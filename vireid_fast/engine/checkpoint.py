"""Atomic, verified checkpoints.

File format: ``MAGIC`` (12 bytes) | payload length (8 bytes, little endian) | sha256 of the payload (32 bytes) |
payload (a ``torch.save`` archive of tensors and plain Python values, so it loads with ``weights_only=True``).
Written to a hidden temporary file ``.ckpt-<host>-<pid>-<token>-<random>.tmp`` in the same folder, fsynced, then
renamed over the target: a crash never leaves a half-written checkpoint under the real name, and a file truncated or
altered afterwards is detected on load. The file gets the permissions of the other run files (``0o666`` minus the
umask). Temporary files left by an interrupted save (a killed process) are removed by the next save or load in that
folder: those of a process on this host that no longer runs at once, any other one once untouched for
:data:`STALE_AFTER` seconds (a save in progress writes continuously, so it is never that old).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Mapping

import torch

from ..data.records import list_some

MAGIC = b"VIREIDCKPT1\n"
HEADER = len(MAGIC) + 8 + 32
TEMP_PREFIX = ".ckpt-"
STALE_AFTER = 600.0  # seconds without a write after which any temporary checkpoint file counts as abandoned

# This process incarnation: a restarted job may get the pid of the killed one, the token tells them apart.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
_TOKEN = secrets.token_hex(4)
_TEMP_NAME = re.compile(r"\.ckpt-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)-[0-9a-f]+\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (truncated, corrupt, not a vireid_fast checkpoint, or from another config)."""


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files of interrupted saves in ``folder`` (see the module docstring); returns their
    paths. Files that cannot be removed (read-only folder, another owner) are left alone."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            age = now - os.stat(path).st_mtime
        except OSError:
            continue
        match = _TEMP_NAME.fullmatch(name)
        if match and match["host"] == _HOST:
            pid = int(match["pid"])
            if pid == os.getpid():
                stale = match["token"] != _TOKEN  # ours: a save in progress in another thread
            else:
                stale = not _pid_alive(pid) or age > STALE_AFTER
        else:  # another host, or the name of an older version: only the age can tell
            stale = age > STALE_AFTER
        if stale:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` (tensors and plain Python values) to ``path`` atomically (see the module docstring)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{_TOKEN}-{secrets.token_hex(4)}.tmp")
    # O_EXCL: never follow a planted link; mode 0o666 so the umask decides, as for every other run file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(data)) + hashlib.sha256(data).digest())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, required: Iterable[str] = ()) -> dict:
    """The payload saved at ``path`` (tensors on the CPU), verified against its header and sha256.

    required: top-level keys the caller needs; any missing one raises a CheckpointError naming them.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the path of a checkpoint.pt written by a run")
    remove_stale_temp_files(os.path.dirname(os.path.abspath(path)))
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < HEADER or not blob.startswith(MAGIC):
        if blob.startswith(MAGIC[: len(blob)]) and len(blob) < HEADER:
            raise CheckpointError(f"checkpoint {path} is truncated ({len(blob)} bytes, shorter than its header)")
        raise CheckpointError(f"{path} is not a vireid_fast checkpoint (bad magic bytes)")
    (length,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    digest = blob[len(MAGIC) + 8:HEADER]
    data = blob[HEADER:]
    if len(data) != length:
        raise CheckpointError(f"checkpoint {path} is truncated: payload has {len(data)} of {length} bytes "
                              "(the write was interrupted or the copy is incomplete); use an earlier checkpoint")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 mismatch")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a verified file that does not unpickle was written by something else
        raise CheckpointError(f"checkpoint {path} has a payload torch.load cannot read ({type(error).__name__}: "
                              f"{error}); it was not written by vireid_fast's save_checkpoint") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the dict of a run")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks key(s) {', '.join(missing)} (present: "
                              f"{', '.join(map(str, state)) or 'none'}); it was written by another program or "
                              "version: resume from a checkpoint.pt of this version, or start a new run")
    return state


def check_state_dict(expected: Mapping[str, torch.Tensor], loaded, what: str, path: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected and wrongly shaped entry of ``loaded`` (the
    checkpoint's ``what`` state dict) against ``expected`` (the live module's ``state_dict()``)."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {path}: '{what}' must be a state dict (names to tensors), got "
                              f"{type(loaded).__name__}")
    missing = [k for k in expected if k not in loaded]
    unexpected = [str(k) for k in loaded if k not in expected]
    wrong = [f"{k} {tuple(loaded[k].shape) if isinstance(loaded[k], torch.Tensor) else type(loaded[k]).__name__} "
             f"(expected {tuple(v.shape)})" for k, v in expected.items()
             if k in loaded and (not isinstance(loaded[k], torch.Tensor) or loaded[k].shape != v.shape)]
    problems = [f"{label}: {list_some(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise CheckpointError(f"checkpoint {path}: '{what}' does not fit this model ({'; '.join(problems)}); was "
                              "it written with another model config (model.arch, model.widths, ...)?")


def prepare_output_dir(path: str) -> str:
    """Create the run folder ``path`` (experiment.output_dir) and check it is writable; ConfigError otherwise."""
    from ..config import ConfigError

    if not path:
        raise ConfigError("experiment.output_dir: is empty; set a folder for the run files (--output-dir DIR)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"experiment.output_dir: {path!r} exists and is not a folder; choose another folder with "
                          "--output-dir DIR")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"experiment.output_dir: cannot create {path!r} ({error.strerror or error}); choose "
                          "another folder with --output-dir DIR") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"experiment.output_dir: {path!r} is not writable; choose another folder with "
                          "--output-dir DIR")
    return path
