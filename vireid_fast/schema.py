"""Declaring config keys: :func:`spec` makes a dataclass field that carries its validation rules.

A leaf module (imports nothing of the package), so that method plug-ins can declare their ``Params`` without
importing :mod:`vireid_fast.config`, which imports the method registry to validate the ``method:`` section.
"""

from __future__ import annotations

from dataclasses import field


def spec(default, *, help: str = "", min: float | None = None, max: float | None = None,  # noqa: A002
         choices: tuple | None = None, min_exclusive: bool = False, length: int | None = None):
    """A dataclass field with validation metadata (checked by :func:`vireid_fast.config.build_section`).

    min/max: inclusive bounds (``min_exclusive``: strict lower bound); choices: allowed values; length: the entry
    count of a list value.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive,
            "length": length}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


__all__ = ["spec"]
