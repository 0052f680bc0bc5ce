"""Shared building blocks: logically-named params, dense layers with f32 accumulation, RMSNorm.

Every param is created through `param()`, which attaches logical axis names (mapped to mesh
axes by the config's rules). Matmuls run in the compute dtype but always accumulate in float32
(`preferred_element_type`), then cast back: bf16 accumulation loses precision on CPU and GPU alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """`x @ w` over the last axis of x in `dtype`, accumulated in float32 and cast to `dtype`."""
    y = jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(dtype)


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
