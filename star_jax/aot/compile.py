"""Compile a stage's train step for a TPU slice on this machine: does it fit, and how fast is it.

`compile_step(config, tpu, num_slices)` builds the trainer's own step (`train_step`:
`abstract_state`, `make_train_step`, `jit_train_step`, fed by `train.make_task`) from abstract
state and the abstract batch (`input.signature`), with the config's mesh (ICI x DCN, checked
against the slice) over compile-only TPU devices, and runs the real XLA:TPU compiler on it.
Nothing is allocated. The result (`AotResult`) holds per-device memory from `memory_analysis()`,
the compiler's FLOPs from `cost_analysis()` beside the analytic count, and the step time at a
given fraction of the chip's bf16 peak. A program that does not fit keeps the compiler's own
RESOURCE_EXHAUSTED message and figures.

`search(config, tpu, ...)` finds the largest per-device batch that fits for each remat policy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from star_jax import optim, sharding, train, train_step
from star_jax.aot import topology
from star_jax.configs import validation
from star_jax.input import signature

# Remat policies in order of recomputation (least first); memory falls in the same order.
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
DCN_AXES = ("data", "fsdp")  # only these may span slices: their collectives tolerate DCN bandwidth


class AotError(ValueError):
    """A config that cannot be compiled for the slice (mesh, slice count); the message names the setting."""


@dataclasses.dataclass
class AotResult:
    """What the compiler said about one step. Bytes are per device; FLOPs are per step, all devices.

    fits: the program compiled within HBM. peak_bytes: when it fits, the compiler's own peak
    (`memory_analysis().peak_memory_in_bytes`, from buffer liveness; parts_bytes where the
    compiler reports none); when it does not, the compiler's figure (plus the arguments' shards
    when that figure counts temporaries only: a lower bound), None when its message gives none.
    parts_bytes: arguments + outputs - aliased (donated) + temporaries + generated code, which
    can exceed the peak (the temporaries are one allocation, not all live at once).
    flops_compiled: `cost_analysis()` x devices; a `lax.scan`
    body (scanned layers, microbatches) counts once. step_time_s / tokens_per_s: analytic FLOPs
    (the compiler's when the stage has no analytic count) at `mfu` of the bf16 peak.
    """

    topology: str
    num_slices: int
    num_devices: int
    mesh: dict[str, int]
    batch_size: int
    per_device_batch: float
    grad_accum: int
    remat_policy: str
    scan_layers: bool
    fits: bool
    hbm_bytes: int
    peak_bytes: int | None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    parts_bytes: int | None = None
    compiler_message: str | None = None
    flops_compiled: float | None = None
    flops_analytic: float = 0.0
    tokens_per_step: int = 0
    mfu: float = 0.5
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    compile_s: float = 0.0

    @property
    def over_bytes(self) -> int | None:
        """Bytes per device beyond HBM when it does not fit (None when it fits or is unknown)."""
        if self.fits or self.peak_bytes is None:
            return None
        return self.peak_bytes - self.hbm_bytes

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field, plus `over_bytes`."""
        return {**dataclasses.asdict(self), "over_bytes": self.over_bytes}


def mesh_shapes(config, tpu: topology.TpuSlice, num_slices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici, dcn) sizes of config.mesh with any -1 filled, checked against `num_slices` slices of
    `tpu`: ici covers one slice, dcn the slices, and only data / fsdp span slices. An AotError
    naming the setting otherwise."""
    ici, dcn = tuple(config.mesh.ici), tuple(config.mesh.dcn)
    names = sharding.MESH_AXES
    for key, sizes in (("ici", ici), ("dcn", dcn)):
        if len(sizes) != len(names) or any(s == 0 or s < -1 for s in sizes):
            raise AotError(f"config.mesh.{key}={sizes}: needs {len(names)} sizes {names}, each positive or -1")
    if -1 in ici and -1 in dcn or ici.count(-1) > 1 or dcn.count(-1) > 1:
        raise AotError(f"config.mesh: at most one -1 over ici {ici} and dcn {dcn}")
    for axis, size in zip(names, dcn):
        if size != 1 and axis not in DCN_AXES:
            raise AotError(
                f"config.mesh.dcn={dcn}: axis {axis!r} cannot span slices (DCN); only {' / '.join(DCN_AXES)} may"
            )

    def fill(sizes, total, key, unit, whole):
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if total % known:
                raise AotError(f"config.mesh.{key}={sizes}: {whole} has {total} {unit}, not divisible by {known}")
            sizes = tuple(total // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != total:
            raise AotError(f"config.mesh.{key}={sizes} covers {math.prod(sizes)} {unit}, but {whole} has {total}")
        return sizes

    ici = fill(ici, tpu.num_devices, "ici", "devices", f"a {tpu.name} slice")
    if math.prod(s for s in dcn if s != -1) != num_slices and -1 not in dcn:
        hint = f" (e.g. --config.mesh.dcn={num_slices},1,1)" if num_slices > 1 else ""
        raise AotError(f"config.mesh.dcn={dcn} spans {math.prod(dcn)} slices, but --num_slices={num_slices}{hint}")
    dcn = fill(dcn, num_slices, "dcn", "slices", f"--num_slices={num_slices}")
    return ici, dcn


def with_batch(config, per_device_batch: int | None = None, remat_policy: str | None = None, ici=None, dcn=None):
    """A copy of `config` with the global batch set to `per_device_batch` x data x fsdp (when given),
    the decoder's remat policy, and the filled mesh sizes (when given)."""
    config = copy.deepcopy(config)
    if ici is not None:
        config.mesh.ici, config.mesh.dcn = tuple(ici), tuple(dcn)
    if per_device_batch is not None:
        shape = [a * b for a, b in zip(config.mesh.ici, config.mesh.dcn)]
        config.train.batch_size = per_device_batch * shape[0] * shape[1]
    if remat_policy is not None:
        config.model.decoder.remat_policy = remat_policy
    return config


def _split_oom(message: str) -> tuple[int | None, bool, int | None]:
    """(required bytes, whether that figure counts temporaries only, available bytes) per device
    from a RESOURCE_EXHAUSTED compiler message; None where the message gives no figure."""
    available = topology.available_hbm(message)
    for pattern, temporaries_only in (
        (r"required for HLO temporaries \(([\d.]+)\s*([KMGT]?)i?B?\)\s*exceeds", True),
        (r"Used ([\d.]+)\s*([KMGT]?)i?B? of [\d.]+\s*[KMGT]?i?B? hbm", False),
    ):
        m = re.search(pattern, message)
        if m:
            return topology.parse_size(*m.groups()), temporaries_only, available
    return None, False, available


def argument_bytes(args) -> int:
    """Bytes of one device's shards of the abstract arguments `args` (ShapeDtypeStructs with
    shardings; a PRNG key counts as its uint32 words)."""
    total = 0
    for x in jax.tree.leaves(args):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            total += 8 * math.prod(shape)
        else:
            total += math.prod(shape) * x.dtype.itemsize
    return total


def _abstract_step(config, mesh, rules):
    """(jitted step, its abstract arguments) as the trainer builds them for `config` on `mesh`."""
    task = train.make_task(config)
    tx = optim.make_optimizer(config.train)
    graphdef, state, frozen = train_step.abstract_state(task.build_model, list(config.train.trainable), tx, mesh, rules)
    step_fn = train_step.task_step(task, graphdef, tx, config.train)
    jitted = train_step.jit_train_step(step_fn, state, frozen)
    axes = task.batch_axes or {}
    example = signature.example_signature(config)
    shardings = {
        key: sharding.logical_sharding(mesh, rules, axes.get(key) or ("batch",) + (None,) * len(shape))
        for key, (shape, _) in example.items()
    }
    batch = signature.batch_signature(config, shardings=shardings)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=replicated)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    args = (state["params"], frozen, state["other"], state["opt_state"], batch, rng, step)
    return jitted, args, task


def compile_step(config, tpu: topology.TpuSlice, num_slices: int = 1, *, mfu: float = 0.5) -> AotResult:
    """Compiles the train step of `config` for `num_slices` slices of `tpu` (see module docstring).

    Raises AotError / ConfigError (ValueErrors naming the setting) for a mesh that does not match
    the slice or a batch that does not divide; a compiler error other than running out of HBM
    propagates.
    """
    ici, dcn = mesh_shapes(config, tpu, num_slices)
    config = with_batch(config, ici=ici, dcn=dcn)
    config.train.sample_every = 0  # sample grids run outside the step; they would read records
    num_devices = tpu.num_devices * num_slices
    validation.validate(config, num_devices=num_devices)
    devices = topology.devices(tpu, num_slices)
    mesh = sharding.make_mesh(ici, dcn, devices=devices)
    rules = sharding.rules_from_config(config)
    start = time.perf_counter()
    jitted, args, task = _abstract_step(config, mesh, rules)
    with sharding.use_mesh(mesh, rules):  # the model's activation constraints read the rules
        lowered = jitted.lower(*args)
    shape = dict(mesh.shape)
    tc = config.train
    result = AotResult(
        topology=tpu.name,
        num_slices=num_slices,
        num_devices=num_devices,
        mesh=shape,
        batch_size=tc.batch_size,
        per_device_batch=tc.batch_size / (shape["data"] * shape["fsdp"]),
        grad_accum=tc.grad_accum,
        remat_policy=config.model.decoder.remat_policy,
        scan_layers=bool(config.model.decoder.scan_layers),
        fits=False,
        hbm_bytes=topology.hbm_bytes(tpu),
        peak_bytes=None,
        flops_analytic=task.flops_per_example * tc.batch_size,
        tokens_per_step=task.tokens_per_example * tc.batch_size,
        mfu=mfu,
    )
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError; only RESOURCE_EXHAUSTED is an answer)
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        result.compiler_message = message.strip().splitlines()[0]
        required, temporaries_only, available = _split_oom(message)
        if temporaries_only:  # the compiler names temporaries; the arguments sit in HBM beside them
            result.temp_bytes = required
            result.argument_bytes = argument_bytes(args)
            required += result.argument_bytes
        result.peak_bytes = required
        result.hbm_bytes = available or result.hbm_bytes
        result.compile_s = time.perf_counter() - start
        return result
    result.compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    result.fits = True
    result.argument_bytes = mem.argument_size_in_bytes
    result.output_bytes = mem.output_size_in_bytes
    result.alias_bytes = mem.alias_size_in_bytes
    result.temp_bytes = mem.temp_size_in_bytes
    result.code_bytes = mem.generated_code_size_in_bytes
    result.parts_bytes = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    result.peak_bytes = getattr(mem, "peak_memory_in_bytes", 0) or result.parts_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops") is not None:
        result.flops_compiled = float(cost["flops"]) * num_devices  # cost_analysis counts one device
    flops = result.flops_analytic or result.flops_compiled or 0.0
    if flops:
        result.step_time_s = flops / (num_devices * tpu.peak_flops_per_device * mfu)
        result.tokens_per_s = result.tokens_per_step / result.step_time_s
    return result


@dataclasses.dataclass
class SearchResult:
    """The largest per-device batch that fits under each remat policy (0: none fits) and the pick:
    the largest batch, the least recomputation among policies that reach it. `best` is its
    AotResult (None when nothing fits); `tried` every (policy, per-device batch, fits)."""

    per_policy: dict[str, int]
    best_policy: str | None
    best: AotResult | None
    tried: list[tuple[str, int, bool]]


def largest_fitting(fits: Callable[[int], bool], start: int, step: int, limit: int) -> int:
    """The largest multiple of `step` in [step, limit] with fits(b) true, assuming fits is monotone
    (true up to some batch, false above); `start` (a multiple of step) is known to fit, or 0.
    Doubles from `start` until a batch fails, then bisects. 0 when `step` itself does not fit."""
    lo = start
    hi = None
    b = max(start * 2, step)
    while b <= limit:
        if fits(b):
            lo = b
            b *= 2
        else:
            hi = b
            break
    if hi is None:
        hi = min(b, limit + step)
    while hi - lo > step:
        mid = (lo + hi) // (2 * step) * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def search(
    config,
    tpu: topology.TpuSlice,
    num_slices: int = 1,
    *,
    policies: Sequence[str] = REMAT_POLICIES,
    max_per_device_batch: int = 256,
    mfu: float = 0.5,
    on_result: Callable[[AotResult], None] | None = None,
) -> SearchResult:
    """Largest per-device batch (a multiple of train.grad_accum) that fits, per remat policy.

    Policies are tried in order of recomputation; a policy that recomputes more never holds less,
    so each search starts from the previous policy's batch. `on_result` sees every compile.
    """
    ici, dcn = mesh_shapes(config, tpu, num_slices)
    accum = config.train.grad_accum
    tried: list[tuple[str, int, bool]] = []
    results: dict[tuple[str, int], AotResult] = {}
    per_policy: dict[str, int] = {}
    floor = 0
    for policy in policies:

        def fits(b: int, policy=policy) -> bool:
            result = compile_step(with_batch(config, b, policy, ici, dcn), tpu, num_slices, mfu=mfu)
            results[(policy, b)] = result
            tried.append((policy, b, result.fits))
            if on_result is not None:
                on_result(result)
            return result.fits

        per_policy[policy] = largest_fitting(fits, floor, accum, max_per_device_batch)
        floor = per_policy[policy]
    best_batch = max(per_policy.values(), default=0)
    if not best_batch:
        return SearchResult(per_policy, None, None, tried)
    best_policy = next(p for p in policies if per_policy[p] == best_batch)
    return SearchResult(per_policy, best_policy, results[(best_policy, best_batch)], tried)
