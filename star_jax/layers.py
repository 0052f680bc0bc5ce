"""Shared building blocks: logically-named params, matmuls, attention, SwiGLU, dense layers, RMSNorm.

Every param is created through `param()`, which attaches logical axis names (mapped to mesh
axes by the config's rules). Every matmul goes through `dot`: inputs in the compute dtype,
float32 accumulation, and a backward pass in the compute dtype too. The last part needs a custom
VJP: the transpose of a `preferred_element_type=float32` dot takes a float32 cotangent, so both
backward matmuls would run in float32 (about 5x slower than bf16 on this project's AMX CPU host;
a bf16-output dot does not help there, XLA's CPU backend computes it in float32). `attention` and
`swiglu` are custom VJPs for the same reason and keep fewer residuals than autodiff would. `dot`
and `attention` name their outputs for the remat policies (`DOT`, `ATTENTION_DOT`):
`checkpoint_dots` cannot see a matmul inside a custom VJP.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Initializer = nnx.initializers.Initializer


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An `nnx.Param` of `shape` and `dtype`, annotated with logical axis `names`."""
    if len(names) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} logical names, got {tuple(names)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding=tuple(names))


# Checkpoint names of matmul outputs: weight matmuls, and attention's q.k and probs.v.
DOT, ATTENTION_DOT = "dot", "attention_dot"


def dot(spec: str, x: jax.Array, y: jax.Array, dtype, *, out_dtype=None, name: str = DOT) -> jax.Array:
    """`jnp.einsum(spec, x, y)` with both inputs cast to `dtype` and float32 accumulation.

    Returns `out_dtype` (default `dtype`), named `name` for the remat policies. The backward pass
    rounds the cotangent to `dtype` and computes both input gradients in `dtype` with float32
    accumulation, as the forward. `spec`: two operands; every index of one input appears in the
    other or in the output; `...` stands for x's leading axes.
    """
    x, y = x.astype(dtype), y.astype(dtype)
    spec = _expand_ellipsis(spec, x.ndim)
    if jnp.dtype(dtype) == jnp.float32:
        out = jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
    else:
        out = _dot_f32(spec, x, y)
    return checkpoint_name(out.astype(out_dtype or dtype), name)


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """`x @ w` over the last axis: x [..., in], w [in, out] -> [..., out] in `dtype` (see `dot`)."""
    return dot("...i,io->...o", x, w, dtype)


def _expand_ellipsis(spec: str, x_ndim: int) -> str:
    inputs, out = spec.split("->")
    sx, sy = inputs.split(",")
    if "..." in spec:
        if "..." in sy or "..." not in sx:
            raise ValueError(f"dot spec {spec!r}: '...' is supported in the first operand (and output) only")
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec][: x_ndim - len(sx.replace("...", ""))]
        sx, out = sx.replace("...", "".join(free)), out.replace("...", "".join(free))
    for a, b in ((sx, sy), (sy, sx)):
        if set(a) - set(b) - set(out):
            raise ValueError(f"dot spec {spec!r}: an index of {a!r} is in neither the other input nor the output")
    return f"{sx},{sy}->{out}"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    dtype,
    *,
    scale: float,
    score_spec: str,
    value_spec: str,
) -> jax.Array:
    """Softmax attention: p = softmax(where(mask, scale * einsum(score_spec, q, k), min)) over the
    last axis, out = einsum(value_spec, p, v) in `dtype`, named `ATTENTION_DOT`.

    q, k, v are cast to `dtype`; scores and softmax are float32, p is `dtype`. `mask` (bool, True =
    attend) broadcasts against the scores. The backward pass keeps only p (in `dtype`) besides q,
    k and v, where autodiff of the same forward also keeps the float32 scores, and computes the
    score gradient p * (dp - sum(p * dp)) in one elementwise pass. Specs as in `dot`.
    """
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    score_spec, value_spec = _expand_ellipsis(score_spec, q.ndim), _expand_ellipsis(value_spec, q.ndim)
    out = _attention(score_spec, value_spec, scale, q, k, v, mask)
    return checkpoint_name(out, ATTENTION_DOT)


def _probs(score_spec, scale, q, k, mask):
    scores = jnp.einsum(score_spec, q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(score_spec, value_spec, scale, q, k, v, mask):
    probs = _probs(score_spec, scale, q, k, mask)
    return jnp.einsum(value_spec, probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _attention_fwd(score_spec, value_spec, scale, q, k, v, mask):
    probs = _probs(score_spec, scale, q, k, mask)
    out = jnp.einsum(value_spec, probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out, _pack((q, k, v, mask, probs))


def _attention_bwd(score_spec, value_spec, scale, residuals, g):
    q, k, v, mask, probs = _unpack(residuals)
    (sq, sk), ss = score_spec.split("->")[0].split(","), score_spec.split("->")[1]
    (sp, sv), so = value_spec.split("->")[0].split(","), value_spec.split("->")[1]
    g = g.astype(q.dtype)
    dprobs = jnp.einsum(f"{so},{sv}->{sp}", g, v, preferred_element_type=jnp.float32)
    p = probs.astype(jnp.float32)
    dscores = jnp.where(mask, p * (dprobs - jnp.sum(p * dprobs, axis=-1, keepdims=True)) * scale, 0.0)
    dscores = dscores.astype(q.dtype)
    dq = jnp.einsum(f"{ss},{sk}->{sq}", dscores, k, preferred_element_type=jnp.float32).astype(q.dtype)
    dk = _contract_scores(sq, q, ss, dscores, sk)
    dv = _contract_scores(so, g, sp, probs, sv)
    return dq, dk, dv.astype(v.dtype), None


def _contract_scores(sa: str, a: jax.Array, ss: str, scores: jax.Array, out: str) -> jax.Array:
    """einsum(f"{sa},{ss}->{out}", a, scores) (float32 accumulation, a's dtype), computed with
    the [.., S] scores as the right operand in their own layout (contracted axes before the kept
    one) and the result transposed after: XLA would otherwise transpose the scores, the largest
    array in attention, for the matmul."""
    order = "".join(c for c in out if c in sa and c in ss) + "".join(c for c in out if c in sa and c not in ss)
    order += "".join(c for c in out if c not in order)
    y = jnp.einsum(f"{sa},{ss}->{order}", a, scores, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.transpose(y, [order.index(c) for c in out])


def _einsum_grads(spec: str, x: jax.Array, y: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients of `einsum(spec, x, y)` for cotangent g, computed in x's dtype (g rounded to
    it) with float32 accumulation."""
    inputs, out = spec.split("->")
    sx, sy = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{sy}->{sx}", g, y, preferred_element_type=jnp.float32).astype(x.dtype)
    dy = jnp.einsum(f"{sx},{out}->{sy}", x, g, preferred_element_type=jnp.float32).astype(y.dtype)
    return dx, dy


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dot_f32(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _dot_f32_fwd(spec, x, y):
    return _dot_f32(spec, x, y), _pack((x, y))


def _dot_f32_bwd(spec, residuals, g):
    return _einsum_grads(spec, *_unpack(residuals), g)


_dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, elementwise in float32, returned in gate's dtype.

    The backward pass keeps only gate and up (autodiff of the same expression keeps five arrays
    of this size) and recomputes the sigmoid.
    """
    g32 = gate.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), _pack((gate, up))


def _swiglu_bwd(residuals, ct):
    gate, up = _unpack(residuals)
    g, u, c = gate.astype(jnp.float32), up.astype(jnp.float32), ct.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    dgate = c * u * sig * (1.0 + g * (1.0 - sig))
    return dgate.astype(gate.dtype), (c * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _pack(residuals):
    # bf16 residuals are kept as their raw 16-bit words: inside a layer scan, XLA's CPU backend
    # stacks a bf16 residual through an f32 round trip of the whole update, an integer one as is.
    return tuple(jax.lax.bitcast_convert_type(r, jnp.uint16) if r.dtype == jnp.bfloat16 else r for r in residuals)


def _unpack(residuals):
    return tuple(jax.lax.bitcast_convert_type(r, jnp.bfloat16) if r.dtype == jnp.uint16 else r for r in residuals)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] named `names`; bias [out] named `names[-1]`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = nnx.initializers.zeros,
        rngs: nnx.Rngs,
    ):
        kernel_init = kernel_init or nnx.initializers.normal(stddev=in_features**-0.5)
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = param(rngs, bias_init, (out_features,), names[-1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in self.dtype."""
        y = matmul(x, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32: x / sqrt(mean(x^2) + eps) * scale, cast back to `dtype`."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim] in self.dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts the normalised activations to the input dtype before scaling.
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)
