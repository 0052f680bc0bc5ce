"""layers.dot / attention / swiglu: the custom VJPs give autodiff's gradients, and keep the backward
matmuls in the compute dtype (the reason they exist)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from star_jax import layers, sharding
from star_jax.models import qwen2


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _reference_attention(q, k, v, mask, scale, score_spec, value_spec):
    scores = jnp.einsum(score_spec, q, k, precision="highest") * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum(value_spec, probs, v, precision="highest")


def _grads(fn, *args):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * _rand(99, fn(*args).shape)), range(len(args)))(
        *args
    )


@pytest.mark.parametrize("spec", ["btd,dhk->bthk", "...i,io->...o", "btd,vd->btv"])
def test_dot_float32_matches_einsum_and_its_gradients(spec):
    x = _rand(0, (2, 5, 8))
    y = _rand(1, (8, 3, 4) if "dhk" in spec else ((6, 8) if "vd" in spec else (8, 6)))
    out = layers.dot(spec, x, y, jnp.float32)
    ref = jnp.einsum(spec, x, y, precision="highest")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        _grads(lambda a, b: layers.dot(spec, a, b, jnp.float32), x, y),
        _grads(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), x, y),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dot_bfloat16_gradients_match_float32_within_bf16_rounding():
    x, y = _rand(0, (4, 16, 64)), _rand(1, (64, 32))
    got = _grads(lambda a, b: layers.dot("btd,do->bto", a, b, jnp.bfloat16, out_dtype=jnp.float32), x, y)
    want = _grads(lambda a, b: jnp.einsum("btd,do->bto", a, b, precision="highest"), x, y)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32  # the input's dtype, whatever the compute dtype
        np.testing.assert_allclose(g, w, rtol=0.05, atol=0.05 * float(jnp.abs(w).max()))


def _backward_dot_input_dtypes(fn, *args):
    """The input dtypes of every dot_general in the jaxpr of fn's gradient (forward included)."""
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), range(len(args))))(*args)
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for inner in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                        walk(inner.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def test_bfloat16_backward_matmuls_run_in_bfloat16():
    """Autodiff of a `preferred_element_type=float32` dot gives float32 x bf16 backward matmuls
    (XLA runs them in float32); every matmul of `dot` and `attention`, both ways, is bf16 x bf16."""
    x, w = _rand(0, (2, 8, 16), jnp.bfloat16), _rand(1, (16, 32), jnp.bfloat16)
    dtypes = _backward_dot_input_dtypes(lambda a, b: layers.dot("btd,do->bto", a, b, jnp.bfloat16), x, w)
    assert len(dtypes) == 3 and set(dtypes) == {("bfloat16", "bfloat16")}
    plain = _backward_dot_input_dtypes(
        lambda a, b: jnp.einsum("btd,do->bto", a, b, preferred_element_type=jnp.float32).astype(a.dtype), x, w
    )
    assert ("float32", "bfloat16") in plain or ("bfloat16", "float32") in plain  # what `dot` avoids
    q, k, v = (_rand(i, (2, 3, 8, 16), jnp.bfloat16) for i in range(3))
    mask = jnp.tril(jnp.ones((8, 8), bool))
    attn = lambda q, k, v: layers.attention(
        q, k, v, mask, jnp.bfloat16, scale=0.25, score_spec="bhqd,bhsd->bhqs", value_spec="bhqs,bhsd->bhqd"
    )
    dtypes = _backward_dot_input_dtypes(attn, q, k, v)
    assert len(dtypes) == 6 and set(dtypes) == {("bfloat16", "bfloat16")}


@pytest.mark.parametrize("layout", ["qwen2", "qwen2_cache", "vision"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_matches_autodiff_of_the_same_forward(layout, dtype):
    """Output and the gradients of q, k, v against plain autodiff; rows 0 of batch 1 attend to
    nothing (all-False mask) and must get zero gradients, as autodiff's where() gives."""
    b, kv, g, t, s, d = 2, 2, 3, 5, 7, 8
    if layout == "vision":
        qs, ks, specs = (b, kv, t, d), (b, kv, s, d), ("bhqk,bhsk->bhqs", "bhqs,bhsk->bhqk")
        mask = jax.random.bernoulli(jax.random.key(5), 0.7, (b, 1, t, s))
    else:
        ks_layout = "bskd" if layout == "qwen2_cache" else "bksd"
        qs, ks = (b, kv, g, t, d), ((b, s, kv, d) if layout == "qwen2_cache" else (b, kv, s, d))
        specs = (f"bkgtd,{ks_layout}->bkgts", f"bkgts,{ks_layout}->bkgtd")
        mask = jax.random.bernoulli(jax.random.key(5), 0.7, (b, 1, 1, t, s))
    mask = mask.at[1, ..., 0, :].set(False)
    q, k, v = _rand(0, qs), _rand(1, ks), _rand(2, ks)
    dt = qwen2.to_dtype(dtype)
    got_fn = lambda q, k, v: layers.attention(
        q, k, v, mask, dt, scale=d**-0.5, score_spec=specs[0], value_spec=specs[1]
    ).astype(jnp.float32)
    want_fn = lambda q, k, v: _reference_attention(q, k, v, mask, d**-0.5, *specs)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=0.05, atol=0.03)
    np.testing.assert_allclose(got_fn(q, k, v), want_fn(q, k, v), **tol)
    for got, want in zip(_grads(got_fn, q, k, v), _grads(want_fn, q, k, v)):
        np.testing.assert_allclose(got, want, **tol)


def test_swiglu_matches_autodiff():
    gate, up = _rand(0, (3, 40)), _rand(1, (3, 40))
    want_fn = lambda g, u: jax.nn.silu(g) * u
    np.testing.assert_allclose(layers.swiglu(gate, up), want_fn(gate, up), rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(layers.swiglu, gate, up), _grads(want_fn, gate, up)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_remat_dots_policy_keeps_the_named_matmul_outputs():
    """`checkpoint_dots` cannot see a matmul inside a custom VJP; the name-based policies can:
    `dots` keeps every matmul output of a decoder layer, `dots_no_batch` the weight matmuls only,
    `full` none. Gradients are the same under every policy."""
    cfg = qwen2.DecoderConfig.from_dict(
        dict(
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            intermediate_size=64,
            vocab_size=50,
            mrope_section=(2, 1, 1),
        )
    )
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        graphdef, state = nnx.split(qwen2.DecoderLayer(cfg, rngs=nnx.Rngs(0)))
    x = _rand(0, (2, 6, 32))
    cos, sin = jnp.ones((2, 6, 8)), jnp.zeros((2, 6, 8))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]

    names = {}
    grads = {}
    for policy in ("dots", "dots_no_batch", "full"):
        fn = jax.checkpoint(run, policy=qwen2.REMAT_POLICIES[policy])
        names[policy] = sorted(r[1].split("'")[1] for r in saved_residuals(fn, state, x) if "named" in r[1])
        grads[policy] = jax.grad(lambda s, x, fn=fn: jnp.sum(fn(s, x) ** 2), argnums=1)(state, x)
    # q, k, v, o, gate, up: the six weight matmuls whose outputs the backward pass reads (down's
    # output only feeds the residual add).
    assert names["dots"].count(layers.DOT) == 6 and names["dots"].count(layers.ATTENTION_DOT) == 1
    assert names["dots_no_batch"] == [layers.DOT] * 6
    assert names["full"] == []
    for policy in ("dots_no_batch", "full"):
        np.testing.assert_allclose(grads[policy], grads["dots"], rtol=1e-5, atol=1e-6)
