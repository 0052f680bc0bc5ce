"""STAR model and CFG decoding: cached = uncached, CFG, sampling filters, seeds, stack copy,
gradients through the frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from star_jax import optim, sharding, stages
from star_jax.configs import star as star_config
from star_jax.decode import generate, sampling, text
from star_jax.text import chat

N_TOKENS = 16


@pytest.fixture(scope="module")
def model():
    config = star_config.get_config("size=tiny,stage=generation")
    config.model.decoder.dtype = "float32"
    config.model.star.stack_init = "random"
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        m = stages.build_model(config, rngs=nnx.Rngs(0))
    # Larger head weights so logits are far from uniform and argmax/top-k are well separated.
    m.image_head.kernel[...] = m.image_head.kernel[...] * 8.0
    return m


def _batch(n=2, tp=12, seed=0):
    rng = np.random.RandomState(seed)
    ids, uncond = [], []
    for _ in range(n):
        row = rng.randint(10, 200, tp).tolist()
        ids.append(row)
        uncond.append(chat.unconditional_ids(row, fim_pad=3))
    positions = np.broadcast_to(np.arange(tp + N_TOKENS), (n, 3, tp + N_TOKENS)).astype(np.int32)
    return {
        "prompt_ids": np.asarray(ids, np.int32),
        "uncond_ids": np.asarray(uncond, np.int32),
        "prompt_mask": np.ones((n, tp), bool),
        "positions": positions,
        "seeds": np.arange(n, dtype=np.int32),
    }


def test_unconditional_row_matches_spec():
    ids = list(range(20, 40))
    u = chat.unconditional_ids(ids, fim_pad=7)
    assert u[0] == ids[0] and u[-4:] == ids[-4:]
    assert u[1:-4] == [7] * (len(ids) - 5)


def test_cached_decoding_equals_uncached_forward(model):
    batch = _batch()
    codes, logits = generate.generate_codes(
        model, batch, num_tokens=N_TOKENS, cfg_weight=3.0, top_k=50, return_logits=True
    )
    cond = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("uncond_ids", "seeds")}
    full = model.image_logits(cond, jnp.asarray(codes))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-4)


def test_cfg_weight_one_is_conditional_greedy(model):
    batch = _batch()
    codes = generate.generate_codes(model, batch, num_tokens=N_TOKENS, cfg_weight=1.0, temperature=0.0)
    cond = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("uncond_ids", "seeds")}
    full = model.image_logits(cond, jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(codes), np.argmax(np.asarray(full), -1))
    # With guidance the unconditional row changes the result.
    guided = generate.generate_codes(model, batch, num_tokens=N_TOKENS, cfg_weight=5.0, temperature=0.0)
    assert not np.array_equal(np.asarray(codes), np.asarray(guided))


def test_two_pass_mode_equals_folded_pairs(model):
    batch = _batch(n=3)
    kw = dict(num_tokens=N_TOKENS, cfg_weight=2.5, top_k=20, top_p=0.9, temperature=1.0)
    a = generate.generate_codes(model, batch, cfg_mode="fold", **kw)
    b = generate.generate_codes(model, batch, cfg_mode="two_pass", **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_seeds_reproduce_and_rows_differ(model):
    batch = _batch(n=2)
    batch["prompt_ids"][1] = batch["prompt_ids"][0]
    batch["uncond_ids"][1] = batch["uncond_ids"][0]
    kw = dict(num_tokens=N_TOKENS, cfg_weight=2.0, temperature=1.0)
    a = np.asarray(generate.generate_codes(model, batch, **kw))
    b = np.asarray(generate.generate_codes(model, batch, **kw))
    np.testing.assert_array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a[0], a[1])  # same prompt, different seeds: different images


def test_top_k_one_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 100))
    keys = jax.random.split(jax.random.key(1), 4)
    got = sampling.sample(logits, keys, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))
    filtered = sampling.top_k_filter(logits, 5)
    assert np.all(np.isfinite(np.asarray(filtered)).sum(-1) == 5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_smallest_set_reaching_p(p):
    logits = jax.random.normal(jax.random.key(2), (8, 50)) * 2
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, p)))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row, keep in zip(probs, kept):
        order = np.argsort(-row)
        need = int(np.searchsorted(np.cumsum(row[order]), p) + 1)  # smallest prefix with mass >= p
        assert keep.sum() == need
        assert set(np.flatnonzero(keep)) == set(order[:need])


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (6, 1.0), (6, 0.7), (0, 1.0)])
def test_sample_draws_from_the_filtered_distribution(top_k, top_p):
    """`sample` (top-k candidates, no full sort) has the distribution of the reference filters."""
    logits = jax.random.normal(jax.random.key(3), (1, 12)) * 1.5
    n = 40_000
    rows = jnp.broadcast_to(logits, (n, 12))
    got = np.asarray(sampling.sample(rows, jax.random.split(jax.random.key(4), n), top_k=top_k, top_p=top_p))
    want = np.asarray(jax.nn.softmax(sampling.top_p_filter(sampling.top_k_filter(logits, top_k), top_p), -1))[0]
    freq = np.bincount(got, minlength=12) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))  # never outside the kept set
    np.testing.assert_allclose(freq, want, atol=0.01)


def test_stack_is_copied_from_last_base_layers(model):
    config = star_config.get_config("size=tiny,stage=generation")
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        m = stages.build_model(config, rngs=nnx.Rngs(1))
    m.copy_stack_from_base()
    n, total = config.model.star.stack_layers, config.model.decoder.num_layers
    base = nnx.state(m.base.stack.layers, nnx.Param).to_pure_dict()
    stack = nnx.state(m.stacked_ar.layers, nnx.Param).to_pure_dict()
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(stack)):
        np.testing.assert_array_equal(np.asarray(a[total - n :]), np.asarray(b))
    np.testing.assert_array_equal(m.base.stack.final_norm.scale[...], m.stacked_ar.final_norm.scale[...])


def test_gradients_flow_through_frozen_base_to_adapter(model):
    batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != "seeds"}
    codes = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, N_TOKENS)), jnp.int32)
    graphdef, params, frozen, other = optim.split_trainable(model, [r"^pixel_adapter/"])

    def loss(p):
        m = nnx.merge(graphdef, p, frozen, other)
        logits = m.image_logits(batch, codes)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, codes[..., None], -1)[..., 0])

    grads = jax.grad(loss)(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(n > 0 for n in norms)  # every adapter param gets gradient, only through the base
    assert not any(k.startswith("base") for k in params)


def test_text_decoding_draws_only_ids_the_tokenizer_has(model):
    """A decoder table larger than the tokenizer (Qwen pads its embedding; the tiny decoder has 256
    rows for the built-in tokenizer's ids) never emits an id the tokenizer cannot turn into text."""
    ids = np.array([[3, 4, 5, 6]], np.int32)
    embeds = model.base.embed(jnp.asarray(ids))
    positions = np.broadcast_to(np.arange(4, dtype=np.int32), (3, 1, 4))
    mask = np.ones((1, 4), bool)
    kw = dict(max_new_tokens=24, stop_ids=(1,), temperature=5.0, seed=3)
    free = text.generate_from_embeds(model.base, embeds, mask, positions, **kw)[0]
    assert max(free) >= 20  # without the limit, a hot sampler reaches the upper rows
    limited = text.generate_from_embeds(model.base, embeds, mask, positions, num_ids=20, **kw)[0]
    assert limited and max(limited) < 20


def test_reference_numerics_tie_and_boundary_rules():
    """--reference_numerics: top-k keeps every token tied with the k-th value; top-p keeps a token
    while the mass before it is <= p (the default keeps it while < p); all in bfloat16."""
    logits = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.1, 0.1]], jnp.float32))
    kept = sampling.reference_filter(logits, top_k=2, top_p=1.0)
    assert kept.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.isfinite(np.asarray(kept, np.float32)), [[1, 1, 1, 0, 0]])  # 2 tied at the 2nd
    # Mass before: 0, 0.4, 0.6, 0.8, 0.9 (bf16): p = 0.6 keeps the third token, the default does not.
    kept = sampling.reference_filter(logits, top_k=0, top_p=0.6)
    np.testing.assert_array_equal(np.isfinite(np.asarray(kept, np.float32)), [[1, 1, 1, 0, 0]])
    default = sampling.top_p_filter(jnp.log(jnp.asarray([[0.5, 0.25, 0.125, 0.125]], jnp.float32)), 0.75)
    np.testing.assert_array_equal(np.isfinite(np.asarray(default)), [[1, 1, 0, 0]])
    ref = sampling.reference_filter(jnp.log(jnp.asarray([[0.5, 0.25, 0.125, 0.125]], jnp.float32)), 0, 0.75)
    np.testing.assert_array_equal(np.isfinite(np.asarray(ref, np.float32)), [[1, 1, 1, 0]])
    # Draws stay inside the kept set.
    keys = jax.random.split(jax.random.key(0), 64)
    draws = sampling.sample(jnp.repeat(logits, 64, 0), keys, top_k=2, reference=True)
    assert set(np.asarray(draws).tolist()) == {0, 1, 2}


def test_reference_numerics_cfg_rounds_to_bfloat16():
    cond, uncond = jnp.asarray([[1.0, 2.0001]]), jnp.asarray([[0.5, 0.3]])
    out = sampling.cfg_combine(cond, uncond, 5.0, reference=True)
    assert out.dtype == jnp.bfloat16
    c, u = cond.astype(jnp.bfloat16), uncond.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(u + jnp.bfloat16(5.0) * (c - u)))
    assert sampling.cfg_combine(cond, uncond, 5.0).dtype == jnp.float32


def test_reference_numerics_decoding_runs_in_bfloat16(model):
    batch = _batch()
    codes, logits = generate.generate_codes(
        model, batch, num_tokens=4, cfg_weight=1.0, temperature=0.0, return_logits=True, reference_numerics=True
    )
    assert logits.dtype == jnp.bfloat16 and codes.shape == (2, 4)
    cond = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("uncond_ids", "seeds")}
    full = np.asarray(model.image_logits(cond, jnp.asarray(codes)))  # float32 teacher forcing
    np.testing.assert_allclose(np.asarray(logits, np.float32), full, rtol=2e-2, atol=2e-2)
