"""Shared config helpers (big_vision style): `parse_arg` for `get_config(arg)` strings."""

from __future__ import annotations

import ml_collections


def _coerce(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("true", "1", "yes", ""):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return type(like)(value)


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses `get_config`'s single string argument, e.g. "size=tiny,stage=generation,runlocal".

    Each keyword of `spec` is a known argument with its default; the value's type converts the
    string (a bare `runlocal` means True). With `lazy=True` unknown keys are kept as strings,
    otherwise they raise naming the key.
    """
    out = ml_collections.ConfigDict(spec)
    if not arg:
        return out
    for i, part in enumerate(arg.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if i == 0 and len(spec) >= 1 and not isinstance(next(iter(spec.values())), bool) and key not in spec:
                key, value = next(iter(spec)), key  # positional first argument: "tiny" == "size=tiny"
            else:
                value = ""
        if key not in spec:
            if not lazy:
                raise ValueError(f"config argument {key!r} is unknown; known: {sorted(spec)}")
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, spec[key])
        except ValueError as e:
            raise ValueError(f"config argument {key}={value!r}: {e}") from None
    return out


def to_list_of_pairs(rules) -> list[list]:
    """Logical rules as JSON-able lists (ConfigDict turns tuples into lists anyway)."""
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]
