"""Meshes, logical-axis rules and shardings.

Model code names every param and key activation with logical axes (`embed`, `mlp`, `heads`,
...); the config maps them to the physical mesh axes (data, fsdp, tensor). This module builds the
mesh from the config (ICI x DCN, one -1 filled from the device count), validates the rules, and
creates params born sharded: `nnx.eval_shape` under the mesh gives abstract state with
`NamedSharding`s, and `jax.jit(init, out_shardings=...)` materialises each shard on its device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical name used in star_jax, mapped to mesh axes. Configs copy and override this.
# A name missing from the rules is an error (see `check_rules_cover`), never a silent replicate.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # params
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("conv_kernel", None),
    ("codebook", "tensor"),
    ("codebook_dim", None),
)


class ShardingError(ValueError):
    """A mesh or rule configuration that cannot work; the message names the field and value."""


def resolve_mesh_shape(ici: Sequence[int], dcn: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Returns the per-axis mesh sizes (ici * dcn), filling at most one -1 from `num_devices`.

    Args:
      ici: sizes within a slice, one per axis of MESH_AXES; at most one -1 over ici and dcn.
      dcn: sizes across slices (1s on a single slice).
      num_devices: `jax.device_count()`.
    """
    ici, dcn = list(ici), list(dcn)
    for name, sizes in (("mesh.ici", ici), ("mesh.dcn", dcn)):
        if len(sizes) != len(MESH_AXES):
            raise ShardingError(f"config.{name}={tuple(sizes)}: needs {len(MESH_AXES)} entries {MESH_AXES}")
        for axis, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise ShardingError(f"config.{name}={tuple(sizes)}: axis {axis!r} has size {size}")
    free = [(n, i) for n, s in (("ici", ici), ("dcn", dcn)) for i, v in enumerate(s) if v == -1]
    if len(free) > 1:
        raise ShardingError(f"config.mesh: at most one -1 over ici {tuple(ici)} and dcn {tuple(dcn)}")
    known = math.prod(v for v in ici + dcn if v != -1)
    if free:
        if num_devices % known:
            raise ShardingError(
                f"config.mesh: ici {tuple(ici)} x dcn {tuple(dcn)} cannot fill -1: {num_devices} devices "
                f"are not divisible by {known}"
            )
        which, i = free[0]
        (ici if which == "ici" else dcn)[i] = num_devices // known
    shape = tuple(a * b for a, b in zip(ici, dcn))
    if math.prod(shape) != num_devices:
        raise ShardingError(
            f"config.mesh: ici {tuple(ici)} x dcn {tuple(dcn)} = {math.prod(shape)} devices, "
            f"but there are {num_devices}"
        )
    return shape


def make_mesh(ici: Sequence[int] = (-1, 1, 1), dcn: Sequence[int] = (1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """Builds a (data, fsdp, tensor) mesh with Auto axes from ICI/DCN sizes."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(ici, dcn, len(devices))
    # mesh_utils orders devices by the physical topology (TPU torus, slices over DCN), so that the
    # inner mesh axes are neighbours on the interconnect; on CPU it is a plain reshape.
    if any(d != 1 for d in dcn) and len(devices) > 1 and hasattr(devices[0], "slice_index"):
        ici_shape = tuple(s // d for s, d in zip(shape, dcn))
        device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, tuple(dcn), devices)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config) -> jax.sharding.Mesh:
    """The mesh of `config.mesh` (fields `ici`, `dcn`) over all devices."""
    return make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))


def single_device_mesh() -> jax.sharding.Mesh:
    """A 1x1x1 mesh on the first device: the same model code path, nothing sharded."""
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules as a tuple of (name, mesh axes) from `config.sharding.rules`."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding.rules)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules) -> PartitionSpec:
    """Resolves logical axis names to a PartitionSpec; raises if a mesh axis is used twice."""
    table = dict(rules)
    resolved, used = [], {}
    for name in names:
        if name is None:
            resolved.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule in config.sharding.rules")
        axes = _as_tuple(table[name])
        for axis in axes:
            if axis in used:
                raise ShardingError(
                    f"logical axes {tuple(names)} resolve to mesh axis {axis!r} twice "
                    f"(via {used[axis]!r} and {name!r}); fix config.sharding.rules"
                )
            used[axis] = name
        resolved.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*resolved)


def check_rules(rules) -> None:
    """Validates rules: known mesh axes only, each name once."""
    seen = set()
    for name, axes in rules:
        if name in seen:
            raise ShardingError(f"config.sharding.rules: logical axis {name!r} appears twice")
        seen.add(name)
        for axis in _as_tuple(axes):
            if axis not in MESH_AXES:
                raise ShardingError(f"config.sharding.rules: {name!r} -> unknown mesh axis {axis!r}")


def param_logical_names(abstract_state) -> list[tuple[str, tuple]]:
    """(path, logical names) of every Variable in an nnx state that carries a `sharding` annotation."""
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        if names is not None:
            out.append(("/".join(map(str, path)), tuple(names)))
    return out


def check_state_sharding(abstract_state, rules, mesh: jax.sharding.Mesh) -> None:
    """Checks every annotated param: each logical name has a rule, no mesh axis is used twice in one
    spec, and each sharded dimension divides evenly by its mesh axes. Raises ShardingError naming
    the param, its shape and its spec."""
    flat = nnx.to_flat_state(abstract_state)
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        if names is None:
            continue
        key = "/".join(map(str, path))
        try:
            spec = logical_to_spec(names, rules)
        except ShardingError as e:
            raise ShardingError(f"param {key}: {e}") from None
        shape = var.get_value().shape
        for dim, axes in zip(shape, spec):
            n = math.prod(mesh.shape[a] for a in _as_tuple(axes))
            if dim % n:
                raise ShardingError(
                    f"param {key} shape {shape}: dimension {dim} is not divisible by mesh axes {axes} "
                    f"(size {n}) under spec {spec}; change config.mesh or config.sharding.rules"
                )


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
    """Context in which nnx modules are built and run: the mesh plus the logical rules."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def create_sharded(make_model: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules) -> nnx.Module:
    """Builds a model whose params are born sharded: never materialised whole on one device.

    `make_model` constructs the module (all randomness from an `nnx.Rngs` it closes over).
    Shapes are evaluated abstractly, validated against the mesh, then one jitted init
    writes every param straight into its `NamedSharding`.
    """
    with use_mesh(mesh, rules):
        graphdef, abstract_state = nnx.get_abstract_model(make_model, mesh)
        check_state_sharding(abstract_state, rules, mesh)
        out_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)

        @jax.jit
        def init():
            return nnx.state(make_model())

        state = jax.jit(init, out_shardings=out_shardings)()
        return nnx.merge(graphdef, state)


def sharded_fraction(model_or_state) -> float:
    """Fraction of parameter bytes whose sharding splits them over more than one device."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    total = sharded = 0
    for x in jax.tree.leaves(state):
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        if not x.sharding.is_fully_replicated:
            sharded += nbytes
    return sharded / max(total, 1)


def logical_sharding(mesh: jax.sharding.Mesh, rules, names: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for an array with the given logical axis names."""
    return NamedSharding(mesh, logical_to_spec(names, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names under the rules in context
    (`use_mesh`); a no-op outside a mesh or when all names resolve to replicated. A dimension that
    its mesh axes do not divide (one image's ViT tokens at inference on 8 devices) stays replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh is None or mesh.empty or not rules or math.prod(mesh.shape.values()) == 1:
        return x
    spec = logical_to_spec(names, rules)
    divisible = lambda dim, axes: dim % math.prod(mesh.shape[a] for a in _as_tuple(axes)) == 0  # noqa: E731
    spec = PartitionSpec(*(axes if axes is None or divisible(dim, axes) else None for dim, axes in zip(x.shape, spec)))
    return jax.lax.with_sharding_constraint(x, spec)
