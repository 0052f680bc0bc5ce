"""The mapping-table machinery every converter shares: layout transforms, entries, and the one
function that fills star_jax params from reference-named tensors.

An `Entry` pairs a star_jax path (`/`-joined nnx state path) with a reference name, which contains
`{i}` when the star_jax param is stacked over layers (leading `layers` axis), and a transform that
converts one (per-layer) tensor in each direction. Import and export walk the same entries, so a
layout bug cannot hide in one direction only. The per-part tables (`decoder_table`, `vision_table`,
`vq_table`, `star_table`) build entries from these pieces; this module imports nothing else from
`star_jax.convert`.

`load_params(targets, entries, tensors)` checks every tensor first (missing / unexpected /
mis-shaped, one `CheckpointError`), then converts and places them one at a time straight into each
target's sharding: `jax.make_array_from_callback` hands every device only its own slice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A weights file or directory that cannot be read as asked; names the file or tensors."""


# -- layout transforms (one per-layer tensor, both directions) -------------------------------------


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight (out, in) <-> Flax kernel (in_dims..., out_dims...) with `n_in` leading in-dims."""

    n_in: int = 1

    def to_flax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(w).T).reshape(shape)

    def to_ref(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[: self.n_in]), -1).T)

    def ref_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))


@dataclasses.dataclass(frozen=True)
class Reshape:
    """Same elements in row-major order; the reference keeps them flat (e.g. q bias (H*hd,) <-> (H, hd))."""

    def to_flax(self, w, shape):
        return np.asarray(w).reshape(shape)

    def to_ref(self, x):
        return np.asarray(x).reshape(-1)

    def ref_shape(self, shape):
        return (math.prod(shape),)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The same tensor in both layouts."""

    def to_flax(self, w, shape):
        return np.asarray(w).reshape(shape)

    def to_ref(self, x):
        return np.asarray(x)

    def ref_shape(self, shape):
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch Conv (out, in, *kernel) <-> Flax (*kernel, in, out)."""

    def to_flax(self, w, shape):
        w = np.asarray(w)
        nd = w.ndim
        return np.ascontiguousarray(np.transpose(w, tuple(range(2, nd)) + (1, 0))).reshape(shape)

    def to_ref(self, x):
        nd = x.ndim
        return np.ascontiguousarray(np.transpose(x, (nd - 1, nd - 2) + tuple(range(nd - 2))))

    def ref_shape(self, shape):
        return (shape[-1], shape[-2], *shape[:-2])


@dataclasses.dataclass(frozen=True)
class Entry:
    flax: str  # star_jax state path, '/'-joined
    ref: str  # reference name; '{i}' marks a param stacked over layers
    transform: object  # Linear | Reshape | Identity | Conv | a part's own (e.g. vision_table.PatchConv)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.ref


# -- one entry, both directions --------------------------------------------------------------------


def ref_names(entry: Entry, flax_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The reference names and shapes one entry covers (one per layer when stacked)."""
    if entry.stacked:
        per_layer = entry.transform.ref_shape(tuple(flax_shape[1:]))
        return [(entry.ref.format(i=i), per_layer) for i in range(flax_shape[0])]
    return [(entry.ref, entry.transform.ref_shape(tuple(flax_shape)))]


def to_flax(entry: Entry, read, flax_shape: tuple[int, ...]) -> np.ndarray:
    """Builds the star_jax tensor of `entry` from `read(ref_name) -> np.ndarray`."""
    if entry.stacked:
        return np.stack(
            [entry.transform.to_flax(read(entry.ref.format(i=i)), tuple(flax_shape[1:])) for i in range(flax_shape[0])]
        )
    return entry.transform.to_flax(read(entry.ref), tuple(flax_shape))


def to_ref(entry: Entry, value: np.ndarray):
    """Yields (reference name, tensor) for a star_jax tensor, unstacking layers in order."""
    if entry.stacked:
        for i in range(value.shape[0]):
            yield entry.ref.format(i=i), entry.transform.to_ref(np.asarray(value[i]))
    else:
        yield entry.ref, entry.transform.to_ref(np.asarray(value))


# -- checks -----------------------------------------------------------------------------------------


def tensor_shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    """Shape of `tensors[name]` without reading it when the mapping is lazy (has `.shape(name)`)."""
    return tuple(tensors.shape(name) if hasattr(tensors, "shape") else np.shape(tensors[name]))


def _report(items: list[str]) -> str:
    return ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")


def widens_exactly(got, target) -> bool:
    """True when every value of float dtype `got` is exactly a value of float dtype `target` (e.g.
    bfloat16 or float16 -> float32: a released bf16 checkpoint loads into float32 params unchanged)."""
    got, target = np.dtype(got), np.dtype(target)
    floats = [d for d in (got, target) if np.issubdtype(d, np.floating) or d == ml_dtypes.bfloat16]
    if len(floats) < 2:
        return False
    a, b = ml_dtypes.finfo(got), ml_dtypes.finfo(target)
    return b.nmant >= a.nmant and b.maxexp >= a.maxexp and b.minexp <= a.minexp


def check_dtypes(entries, want: dict[str, np.dtype], dtype_of, *, source: str, cast: bool = False) -> None:
    """Raises one error naming every reference tensor whose dtype differs from its star_jax param,
    unless the param's dtype holds every value of the tensor's (`widens_exactly`).

    Args:
      entries: the mapping entries; want: star_jax path -> the param's dtype.
      dtype_of: reference name -> np.dtype, or None when the tensor is absent (reported elsewhere).
      cast: when True, mismatches are accepted (the caller converts explicitly).
    """
    if cast:
        return
    wrong = []
    for e in entries:
        target = np.dtype(want[e.flax])
        names = [e.ref.format(i=0)] if e.stacked else [e.ref]
        if e.stacked:  # every layer of a stacked param: a single odd layer is an error too
            i = 1
            while dtype_of(e.ref.format(i=i)) is not None:
                names.append(e.ref.format(i=i))
                i += 1
        for name in names:
            got = dtype_of(name)
            if got is not None and np.dtype(got) != target and not widens_exactly(got, target):
                wrong.append(f"{name}: expected {target}, found {np.dtype(got)}")
    if wrong:
        raise CheckpointError(
            f"{source}: wrong dtype ({len(wrong)}): {_report(wrong)}; pass cast=True (--cast) to convert"
        )


def check_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    entries: Iterable[Entry],
    tensors: Mapping,
    *,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Raises one CheckpointError listing missing, unexpected and mis-shaped reference tensors.

    Args:
      shapes: star_jax path -> param shape, for every entry's path.
      ignore_prefixes: reference names starting with one of these are not reported as unexpected.
    """
    missing, misshaped, used = [], [], set()
    for e in entries:
        if e.flax not in shapes:
            raise KeyError(f"mapping entry {e.flax!r} has no star_jax param (model/table mismatch)")
        for name, want in ref_names(e, tuple(shapes[e.flax])):
            used.add(name)
            if name not in tensors:
                missing.append(name)
            elif (got := tensor_shape(tensors, name)) != want:
                misshaped.append(f"{name}: expected {want}, found {got}")
    unexpected = sorted(n for n in tensors if n not in used and not n.startswith(ignore_prefixes))
    if missing or unexpected or misshaped:
        parts = [
            f"{title} ({len(items)}): {_report(items)}"
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
            if items
        ]
        raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))


# -- placing ----------------------------------------------------------------------------------------


def place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array as a jax.Array with `sharding`: each device receives only its own slice."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_params(
    targets: Mapping[str, object],
    entries: Iterable[Entry],
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> dict[str, jax.Array]:
    """The star_jax arrays of `entries`, built from reference `tensors` into the targets' shardings.

    Args:
      targets: star_jax path -> anything with `.shape`, `.dtype`, `.sharding` (a jax.Array, or a
        jax.ShapeDtypeStruct with a sharding); every entry's path must be there.
      tensors: reference name -> array (lazy mappings with `.shape(name)` are read one tensor at a time).
      ignore_prefixes: reference names not reported as unexpected.
    Returns:
      path -> jax.Array (the target's dtype and sharding), one per entry.
    Raises:
      CheckpointError naming every missing, unexpected and mis-shaped tensor, before anything is placed.
    """
    entries = list(entries)
    check_tensors(
        {p: t.shape for p, t in targets.items()}, entries, tensors, source=source, ignore_prefixes=ignore_prefixes
    )
    out = {}
    for e in entries:
        target = targets[e.flax]
        value = to_flax(e, tensors.__getitem__, tuple(target.shape)).astype(target.dtype, copy=False)
        out[e.flax] = place(value, target.sharding)
        del value
    return out


def fill_state(abstract_state, entries: Iterable[Entry], tensors: Mapping, *, source: str, ignore_prefixes=()):
    """An abstract nnx state (ShapeDtypeStructs with shardings) filled by `load_params`; returns the state."""
    flat = dict(nnx.to_flat_state(abstract_state))
    by_path = {"/".join(map(str, k)): var for k, var in flat.items()}
    entries = list(entries)
    missing = [e.flax for e in entries if e.flax not in by_path]
    if missing:
        raise KeyError(f"mapping entries {missing[:5]} have no star_jax param (model/table mismatch)")
    targets = {e.flax: by_path[e.flax].get_value() for e in entries}
    values = load_params(targets, entries, tensors, source=source, ignore_prefixes=ignore_prefixes)
    for path, value in values.items():
        by_path[path].set_value(value)
    return nnx.from_flat_state(flat)
