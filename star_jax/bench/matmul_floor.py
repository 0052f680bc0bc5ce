"""The matmul floor of a compiled program: its matmuls, each timed alone on this backend.

`python -m star_jax.bench train --floor` uses it to say how fast a step could be with the
backend's own matmul kernels and no other work: every `dot` in the optimised HLO (fusions
included) is re-run as a standalone `lax.dot_general` with the same shapes, dtypes and dimension
numbers, on random inputs, and its time is counted once per occurrence. A `lax.scan` body is one
occurrence in the HLO, so pass a program compiled with the layers unrolled.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "f16": jnp.float16}
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\][^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$")


@dataclasses.dataclass(frozen=True)
class Dot:
    """One matmul: operand dtypes and shapes, output dtype, dimension numbers."""

    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    out_dtype: str
    dims: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def flops(self) -> float:
        """2 x output elements x contracted size."""
        (lc, _), _ = self.dims
        out = np.prod(self.lhs[1]) * np.prod(self.rhs[1])
        contracted = np.prod([self.lhs[1][i] for i in lc]) if lc else 1
        batch = np.prod([self.lhs[1][i] for i in self.dims[1][0]]) if self.dims[1][0] else 1
        return 2.0 * out / contracted / batch

    def __str__(self) -> str:
        return f"{self.lhs[0]}{list(self.lhs[1])} x {self.rhs[0]}{list(self.rhs[1])} -> {self.out_dtype}"


def _ints(text: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def hlo_dots(hlo_text: str) -> collections.Counter:
    """Dot -> occurrences in an optimised HLO module's text (every computation, fusions included)."""
    dots: collections.Counter = collections.Counter()
    for computation in re.split(r"\n(?=\S)", hlo_text):
        shapes = {}
        for line in computation.split("\n"):
            m = _DEF.match(line)
            if m:
                shapes[m.group(1)] = (m.group(2), tuple(int(x) for x in m.group(3).split(",") if x))
        for line in computation.split("\n"):
            m = _DOT.match(line)
            if not m or m.group(3) not in shapes or m.group(4) not in shapes:
                continue
            rest = m.group(5)
            dims = (
                (_ints(rest, "lhs_contracting_dims"), _ints(rest, "rhs_contracting_dims")),
                (_ints(rest, "lhs_batch_dims"), _ints(rest, "rhs_batch_dims")),
            )
            dots[Dot(shapes[m.group(3)], shapes[m.group(4)], m.group(1), dims)] += 1
    return dots


def time_dot(dot: Dot, repeats: int = 3) -> float:
    """Median seconds of `dot` alone (jitted lax.dot_general on random inputs, compile excluded)."""
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal(dot.lhs[1], np.float32), _DTYPES[dot.lhs[0]])
    rhs = jnp.asarray(rng.standard_normal(dot.rhs[1], np.float32), _DTYPES[dot.rhs[0]])
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dims, preferred_element_type=_DTYPES[dot.out_dtype]))
    fn(lhs, rhs).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(lhs, rhs).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclasses.dataclass
class Floor:
    """seconds: all matmuls once each, timed alone; flops: theirs; rows: (dot, count, seconds each)."""

    seconds: float
    flops: float
    rows: list[tuple[Dot, int, float]]


def matmul_floor(hlo_text: str, repeats: int = 3) -> Floor:
    """The matmul floor of an optimised HLO module (see the module docstring)."""
    rows = [(dot, n, time_dot(dot, repeats)) for dot, n in hlo_dots(hlo_text).items()]
    rows.sort(key=lambda r: -r[1] * r[2])
    return Floor(sum(n * s for _, n, s in rows), sum(n * d.flops for d, n, _ in rows), rows)
