"""Quantizer: nearest code (full, chunked, sharded at 65,536 x 512), losses, entropy, usage, re-seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from star_jax import sharding
from star_jax.models import quantizer as qz
from star_jax.models import vq


def _data(n, k, d, seed=0):
    rng = np.random.RandomState(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)


def test_nearest_matches_bruteforce_and_chunks():
    z, cb = _data(50, 256, 16)
    want = np.argmin(((z[:, None, :] - cb[None]) ** 2).sum(-1), axis=-1)
    for chunk in (None, 256, 64, 32):
        idx, dist = qz.nearest_codes(jnp.asarray(z), jnp.asarray(cb), chunk)
        np.testing.assert_array_equal(np.asarray(idx), want)
        np.testing.assert_allclose(np.asarray(dist), ((z - cb[want]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_size=48"):
        qz.nearest_codes(jnp.asarray(z), jnp.asarray(cb), 48)


def test_ties_resolve_to_lowest_index_across_chunks():
    cb = np.zeros((64, 4), np.float32)
    cb[:, 0] = np.arange(64) % 8  # codes 3, 11, 19, ... are identical
    z = np.array([[3.0, 0, 0, 0]], np.float32)
    for chunk in (None, 8, 16):
        assert int(qz.nearest_codes(jnp.asarray(z), jnp.asarray(cb), chunk)[0][0]) == 3


def test_sharded_quantizer_65536x512_equals_unsharded():
    k, d = 65536, 512
    z, cb = _data(24, k, d, seed=1)
    want_idx, want_d = jax.jit(lambda z, c: qz.nearest_codes(z, c, 8192))(z, cb)
    want_out = jax.jit(lambda z, c: qz.quantize(z, c, chunk_size=8192))(z, cb)
    full_idx, _ = jax.jit(lambda z, c: qz.nearest_codes(z, c, None))(z, cb)
    np.testing.assert_array_equal(np.asarray(want_idx), np.asarray(full_idx))
    for ici in ((1, 1, 8), (2, 1, 4)):  # codebook over 8 shards; batch on `data` and codebook over 4
        mesh = sharding.make_mesh(ici)
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            cb_s = jax.device_put(
                cb, NamedSharding(mesh, sharding.logical_to_spec(("codebook", None), sharding.DEFAULT_RULES))
            )
            assert not cb_s.sharding.is_fully_replicated
            out = jax.jit(lambda z, c: qz.quantize(z, c, chunk_size=8192))(jnp.asarray(z), cb_s)
            idx, dist = jax.jit(lambda z, c: qz.nearest_codes(z, c, 8192))(jnp.asarray(z), cb_s)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
        np.testing.assert_array_equal(np.asarray(dist), np.asarray(want_d))
        np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(want_idx))
        for got, want in zip(out, want_out):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # z_q = z + sg(codebook[idx] - z): the code up to float rounding
    np.testing.assert_allclose(np.asarray(want_out.z_q), cb[np.asarray(want_idx)], atol=1e-6)


def test_losses_and_straight_through():
    z, cb = _data(30, 32, 8)
    z = jnp.asarray(z).reshape(2, 3, 5, 8)
    out = qz.quantize(z, jnp.asarray(cb), beta=0.25)
    zq = cb[np.asarray(out.indices)]
    np.testing.assert_allclose(np.asarray(out.z_q), zq, atol=1e-6)
    mse = np.mean((zq - np.asarray(z)) ** 2)
    np.testing.assert_allclose(float(out.codebook_loss), mse, rtol=1e-5)
    np.testing.assert_allclose(float(out.commit_loss), 0.25 * mse, rtol=1e-5)
    assert float(out.entropy_loss) == 0.0
    # straight through: d(sum(w * z_q))/dz = w; codebook loss trains only the codebook, commitment only z
    w = jax.random.normal(jax.random.key(0), z.shape)
    gz = jax.grad(lambda z: jnp.sum(w * qz.quantize(z, jnp.asarray(cb)).z_q))(z)
    np.testing.assert_allclose(np.asarray(gz), np.asarray(w), atol=1e-6)
    g_cb = jax.grad(lambda c: qz.quantize(z, c).commit_loss)(jnp.asarray(cb))
    assert float(jnp.abs(g_cb).max()) == 0.0
    g_z = jax.grad(lambda z: qz.quantize(z, jnp.asarray(cb)).codebook_loss)(z)
    assert float(jnp.abs(g_z).max()) == 0.0


def test_l2_norm_codes():
    z, cb = _data(20, 16, 8)
    out = qz.quantize(jnp.asarray(z), jnp.asarray(cb), l2_norm=True)
    zn, cn = z / np.linalg.norm(z, axis=-1, keepdims=True), cb / np.linalg.norm(cb, axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(out.indices), np.argmax(zn @ cn.T, axis=-1))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.z_q), axis=-1), 1.0, atol=1e-5)


def test_entropy_loss_chunked_equals_direct():
    z, cb = _data(12, 64, 4)
    d = ((z[:, None] - cb[None]) ** 2).sum(-1)
    a = -d / 0.5
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    avg = p.mean(0)
    want = -np.mean(np.sum(p * np.log(p), -1)) + np.sum(avg * np.log(avg + 1e-5))
    for chunk in (None, 16):
        got = qz.entropy_loss(jnp.asarray(z), jnp.asarray(cb), 0.5, chunk)
        np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)
    out = qz.quantize(jnp.asarray(z), jnp.asarray(cb), entropy_weight=0.1, entropy_temperature=0.5, chunk_size=16)
    np.testing.assert_allclose(float(out.entropy_loss), 0.1 * want, rtol=1e-4, atol=1e-6)
    assert np.isfinite(
        np.asarray(jax.grad(lambda z: qz.entropy_loss(z, jnp.asarray(cb), 0.5, 16))(jnp.asarray(z)))
    ).all()


def test_usage_window_perplexity_and_reseed():
    buf = jnp.full((6,), -1.0)
    buf = qz.update_usage_buffer(buf, jnp.array([[1, 2], [2, 5]]))
    np.testing.assert_array_equal(np.asarray(buf), [-1, -1, 1, 2, 2, 5])
    buf = qz.update_usage_buffer(buf, jnp.arange(10, 18) % 8)  # longer than the window: last 6 kept
    np.testing.assert_array_equal(np.asarray(buf), [4, 5, 6, 7, 0, 1])
    assert float(qz.codebook_usage(jnp.array([-1.0, 1, 1, 3]), 8)) == 2 / 8
    assert float(qz.perplexity(jnp.arange(8), 8)) == pytest.approx(8.0)
    assert float(qz.perplexity(jnp.zeros(5, jnp.int32), 8)) == pytest.approx(1.0)

    cb = jnp.zeros((8, 4))
    recent = jnp.arange(20.0).reshape(5, 4) + 1
    new, n = qz.reseed_dead_codes(cb, jnp.array([0.0, 0, 3, 3]), recent, jax.random.key(0))
    assert int(n) == 6
    alive = np.array([0, 3])
    np.testing.assert_array_equal(np.asarray(new)[alive], 0.0)
    dead_rows = np.delete(np.asarray(new), alive, axis=0)
    assert all(any(np.array_equal(r, s) for s in np.asarray(recent)) for r in dead_rows)


def test_module_usage_update_and_reseed_keeps_usage_high():
    cfg = vq.VQConfig.from_size("tiny", codebook_size=64, usage_window=256, chunk_size=16)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        quant = qz.VectorQuantizer(cfg, rngs=nnx.Rngs(0))
        # encoder outputs in a small region far from the init codes: few codes win (collapse)
        z = 3.0 + 0.3 * jax.random.normal(jax.random.key(1), (4, 8, 8, cfg.codebook_dim))
        step = nnx.jit(lambda m, z: m(z, update_usage=True).indices)
        step(quant, z)
        before = float(quant.usage_metrics()["codebook_usage"])
        assert before < 0.2  # collapsed: uniform(-1/K, 1/K) codes, unit-scale inputs
        n = quant.reseed_dead(z, jax.random.key(2))
        assert int(n) == 64 - round(before * 64)
        step(quant, z)
        m = quant.usage_metrics(step(quant, z))
        assert float(m["codebook_usage"]) > 0.8 and float(m["perplexity"]) > 30
