"""Atomic, verified checkpoints.

File format: ``MAGIC`` (12 bytes) | payload length (8 bytes, little endian) | sha256 of the payload (32 bytes) |
payload (a ``torch.save`` archive of tensors and plain Python values, so it loads with ``weights_only=True``).
Written to a temporary file in the same folder, fsynced, then renamed over the target: a crash never leaves a
half-written checkpoint under the real name, and a file truncated or altered afterwards is detected on load.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile

import torch

MAGIC = b"VIREIDCKPT1\n"
HEADER = len(MAGIC) + 8 + 32


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (truncated, corrupt, not a vireid_fast checkpoint, or from another config)."""


def save_checkpoint(path: str, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
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


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
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
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
