"""TPU slices by the names users type (`v5p-128`, `v6e-64`, `v5e-256`, `v4-32`, `tpu7x-128`), as
compile-only devices on any machine.

A name maps to the arguments of `jax.experimental.topologies.get_topology_desc` the way MaxText's
accelerator table does: v4-N, v5p-N and tpu7x-N count TensorCores (N / 2 chips; v4 and v5p run
one megacore device per chip, tpu7x one device per TensorCore), v5e-N and v6e-N count chips. With
the `libtpu` wheel that matches jax installed (`pip install -e .[aot]`) the devices come from the
real XLA:TPU compiler; nothing needs a TPU. HBM per device is the compiler's own figure
(`hbm_bytes`), never a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import re
import sys
import tempfile

# Compile-only TPU devices: let every process (parallel test workers, a second command) load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class TopologyError(ValueError):
    """A slice name or slice count that names no TPU slice; the message lists the known names."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its names count and what a chip does.

    prefix: the user-facing name (`v5p` in `v5p-128`); topology: the prefix get_topology_desc takes.
    per_core_name: N in `<prefix>-N` counts TensorCores (2 per chip) rather than chips.
    devices_per_chip: JAX devices per chip (1 for megacore and single-core chips, 2 for tpu7x).
    chip_config: get_topology_desc's chip_config_name. dims: 3 for a 3D torus, 2 for a 2D one.
    peak_bf16: dense bf16 FLOP/s of one chip (vendor figure), for the step-time estimate.
    """

    prefix: str
    topology: str
    per_core_name: bool
    devices_per_chip: int
    chip_config: str
    dims: int
    peak_bf16: float


GENERATIONS = {
    g.prefix: g
    for g in (
        Generation("v4", "v4", True, 1, "megacore", 3, 275e12),
        Generation("v5p", "v5p", True, 1, "megacore", 3, 459e12),
        Generation("v5e", "v5e", False, 1, "default", 2, 197e12),
        Generation("v6e", "v6e", False, 1, "default", 2, 918e12),
        Generation("tpu7x", "tpu7x", True, 2, "default", 3, 2307e12),
    )
}
ALIASES = {"v5litepod": "v5e"}

# chips -> torus shape of a 3D slice (v4, v5p, tpu7x), as Cloud TPU provisions them.
_SHAPES_3D = dict(
    (int(chips), shape)
    for chips, shape in (
        entry.split(":")
        for entry in """
        1:1x1x1 4:2x2x1 8:2x2x2 16:2x2x4 32:2x4x4 64:4x4x4 128:4x4x8 192:4x4x12 256:4x8x8 320:4x4x20
        384:4x8x12 448:4x4x28 512:8x8x8 576:4x12x12 640:4x8x20 704:4x4x44 768:8x8x12 832:4x4x52
        896:4x8x28 960:4x12x20 1024:8x8x16 1088:4x4x68 1152:8x12x12 1216:4x4x76 1280:8x8x20
        1344:4x12x28 1408:4x8x44 1472:4x4x92 1536:8x12x16 1600:4x20x20 1664:4x8x52 1728:12x12x12
        1792:8x8x28 1856:4x4x116 1920:8x12x20 1984:4x4x124 2048:8x16x16 2112:4x12x44 2176:4x8x68
        2240:4x20x28 2304:12x12x16 2368:4x4x148 2432:4x8x76 2496:4x12x52 2560:8x16x20 2624:4x4x164
        2688:8x12x28 2752:4x4x172 2816:8x8x44 2880:12x12x20 2944:4x8x92 3008:4x4x188 3072:12x16x16
        3136:4x28x28 3200:8x20x20 3264:4x12x68 3328:8x8x52 3392:4x4x212 3456:12x12x24 3520:4x20x44
        3584:8x16x28 3648:4x12x76 3712:4x8x116 3776:4x4x236 3840:12x16x20 3904:4x4x244 3968:4x8x124
        4032:12x12x28 4096:16x16x16 4160:4x20x52 4224:8x12x44 4352:8x8x68 4416:4x12x92 4480:8x20x28
        4608:12x16x24 4736:4x8x148 4800:12x20x20 4864:8x8x76 4928:4x28x44 4992:8x12x52 5120:16x16x20
        5184:12x12x36 5248:4x8x164 5376:12x16x28 5440:4x20x68 5504:4x8x172 5568:4x12x116
        5632:8x16x44 5760:12x20x24 5824:4x28x52 5888:8x8x92 5952:4x12x124 6016:4x8x188 6080:4x20x76
        6144:16x16x24 6912:12x24x24 8192:16x16x32 8960:16x20x28 9216:16x24x24
        """.split()
    )
)
# chips -> shape of a 2D slice (v5e, v6e).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# The largest slice of each generation (v4-4096, v5p-17920, tpu7x-18432); v5e / v6e stop at 256.
_MAX_CHIPS = {"v4": 2048, "v5p": 8960, "tpu7x": 9216}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One slice: `name` as typed, the get_topology_desc arguments, and its size.

    topology_name e.g. "v5p:4x4x4"; chips_per_host_bounds e.g. (2, 2, 1); wrap: torus wrap-around
    per dimension (a full 4-multiple cube on 3D slices, 16-chip rows / columns on 2D ones).
    """

    name: str
    generation: Generation
    chips: int
    topology_name: str
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def num_devices(self) -> int:
        """JAX devices in one slice."""
        return self.chips * self.generation.devices_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        """Dense bf16 FLOP/s of one JAX device."""
        return self.generation.peak_bf16 / self.generation.devices_per_chip


def _name(gen: Generation, chips: int) -> str:
    return f"{gen.prefix}-{chips * 2 if gen.per_core_name else chips}"


def _shapes(gen: Generation) -> dict[int, str]:
    if gen.dims == 2:
        return _SHAPES_2D
    limit = _MAX_CHIPS[gen.prefix]
    # A single-chip 3D slice exists only for tpu7x (tpu7x-2: one chip, two TensorCores).
    return {c: s for c, s in _SHAPES_3D.items() if c <= limit and (c > 1 or gen.prefix == "tpu7x")}


def known_names() -> list[str]:
    """Every slice name `get` accepts, generation by generation, smallest first."""
    return [_name(gen, chips) for gen in GENERATIONS.values() for chips in _shapes(gen)]


def _abbreviated(gen: Generation) -> str:
    names = [_name(gen, c) for c in _shapes(gen)]
    return ", ".join(names if len(names) <= 9 else names[:8] + ["...", names[-1]])


def _known_summary() -> str:
    return "; ".join(_abbreviated(gen) for gen in GENERATIONS.values())


def get(name: str) -> TpuSlice:
    """The slice a user names (`v5p-128`, `v5litepod-16`, ...); a TopologyError listing the known
    names otherwise."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    prefix = ALIASES.get(m.group(1), m.group(1)) if m else None
    gen = GENERATIONS.get(prefix)
    if gen is None:
        raise TopologyError(f"--topology={name!r} is not a TPU slice name; known: {_known_summary()}")
    n = int(m.group(2))
    chips = n // 2 if gen.per_core_name else n
    shapes = _shapes(gen)
    if (gen.per_core_name and n % 2) or chips not in shapes:
        raise TopologyError(f"--topology={name!r}: no {gen.prefix} slice of that size; known: {_abbreviated(gen)}")
    shape = shapes[chips]
    dims = tuple(int(d) for d in shape.split("x"))
    if gen.dims == 2:
        host = (1, 1, 1) if chips == 1 else (2, 2, 1)
        wrap = (dims[0] == 16, dims[1] == 16, False)
    else:
        host = (1, 1, 1) if chips == 1 else (2, 2, 1)
        wrap = (chips >= 64,) * 3
    return TpuSlice(_name(gen, chips), gen, chips, f"{gen.topology}:{shape}", host, wrap)


def libtpu_available() -> bool:
    """Whether the libtpu wheel is installed (compile-only TPU devices need it)."""
    return importlib.util.find_spec("libtpu") is not None


def devices(tpu: TpuSlice, num_slices: int = 1) -> list:
    """The compile-only devices of `num_slices` slices of `tpu` (`slice_index` set when > 1).

    A TopologyError naming --num_slices when it is not positive, or saying how to install libtpu.
    """
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices} must be at least 1")
    if not libtpu_available():
        raise TopologyError(
            "compile-only TPU devices need the libtpu wheel matching jax: pip install -e .[aot] "
            f"(jax {jax.__version__})"
        )
    from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu: only when asked for)

    with _native_stderr_quiet():
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=tpu.topology_name,
            chip_config_name=tpu.generation.chip_config,
            chips_per_host_bounds=tpu.chips_per_host_bounds,
            num_slices=num_slices,
            wrap=tpu.wrap,
        )
    return list(desc.devices)


@contextlib.contextmanager
def _native_stderr_quiet():
    """Keeps what native code writes on file descriptor 2 off the console: libtpu's first load
    warns that this machine is no TPU VM (no accelerator type, no worker hostnames), which is the
    point here. Python errors still propagate as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_HBM_FIGURE = re.compile(r"exceeds available HBM \(([\d.]+)\s*([KMGT]?)i?B?\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(number: str, unit: str) -> int:
    """The compiler's size figure ("95.74", "G") in bytes (XLA prints binary units)."""
    return int(float(number) * _UNITS[unit])


def available_hbm(message: str) -> int | None:
    """Bytes of HBM per device that a RESOURCE_EXHAUSTED compiler message says are available."""
    m = _HBM_FIGURE.search(message)
    return parse_size(*m.groups()) if m else None


@functools.cache
def hbm_bytes(tpu: TpuSlice) -> int:
    """HBM of one device as the compiler counts it: compile a 512 GiB program for one device of
    `tpu` and read the figure from its RESOURCE_EXHAUSTED message (about a second)."""
    device = devices(tpu)[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    huge = jax.ShapeDtypeStruct((2**39,), jnp.uint8, sharding=replicated)
    try:
        jax.jit(lambda a: a + 1, out_shardings=replicated).lower(huge).compile()
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError is what carries the figure)
        found = available_hbm(str(e))
        if found is not None:
            return found
        raise RuntimeError(f"the TPU compiler did not report its HBM for {tpu.name}: {e}") from e
    raise RuntimeError(f"a 512 GiB program compiled for one {tpu.name} device: no HBM limit to read")
