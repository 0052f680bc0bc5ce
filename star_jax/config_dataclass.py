"""Frozen config dataclasses from config blocks: one `from_dict` for the decoder, vision, VQ and
STAR configs, so that every block rejects unknown keys the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: Mapping[str, Any], what: str, **overrides) -> T:
    """`cls(**(d | overrides))` for a dataclass `cls` and a ConfigDict or plain mapping `d`.

    Unknown keys raise ValueError naming them and the known fields: "<what> config has unknown
    keys [...]; known: [...]".
    """
    values = dict(d.to_dict() if hasattr(d, "to_dict") else d) | overrides
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{what} config has unknown keys {unknown}; known: {sorted(fields)}")
    return cls(**values)
