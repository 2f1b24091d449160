"""The two modalities, spelled one way across the package.

``Modality`` is a ``str`` enum: ``Modality.VISIBLE == "visible"`` (records, dict keys and metric names read the same
as before), and ``.code`` is the integer the two-stream encoders take (0 = visible stem, 1 = infrared stem).
"""

from __future__ import annotations

import enum


class Modality(str, enum.Enum):
    VISIBLE = "visible"
    INFRARED = "infrared"

    @property
    def code(self) -> int:
        """0 for visible, 1 for infrared (the encoder's stem index)."""
        return 0 if self is Modality.VISIBLE else 1

    @property
    def other(self) -> Modality:
        return Modality.INFRARED if self is Modality.VISIBLE else Modality.VISIBLE

    @classmethod
    def parse(cls, value) -> Modality:
        """A Modality from itself, its name (``"visible"``/``"infrared"``) or its code (0/1)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in cls._value2member_map_:
            return cls(value)
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return (cls.VISIBLE, cls.INFRARED)[value]
        raise ValueError(f"modality must be 'visible'/'infrared' or 0/1, got {value!r}")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


VISIBLE, INFRARED = Modality.VISIBLE, Modality.INFRARED
MODALITIES = (VISIBLE, INFRARED)

__all__ = ["INFRARED", "MODALITIES", "VISIBLE", "Modality"]
