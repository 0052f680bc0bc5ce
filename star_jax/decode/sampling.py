"""Token sampling: temperature, top-k, top-p, and the CFG combination.

Two numerics. The default works on float32 logits and samples among `lax.top_k` candidates (exactly
k of them). `reference=True` reproduces the reference (STAR_SPEC section 5): logits, CFG, softmax and
the filters in bfloat16, top-k keeping every token tied with the k-th value, top-p keeping a token
while the probability mass before it (descending order) is <= p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def cfg_combine(cond: jax.Array, uncond: jax.Array, weight: float | jax.Array, *, reference: bool = False) -> jax.Array:
    """Classifier-free guidance uncond + w * (cond - uncond), [..., V] -> [..., V]: float32, or with
    `reference` bfloat16 with every operation rounded to bfloat16 (as the reference's bf16 tensors)."""
    dtype = jnp.bfloat16 if reference else jnp.float32
    cond, uncond = cond.astype(dtype), uncond.astype(dtype)
    return uncond + jnp.asarray(weight, dtype) * (cond - uncond)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row ([..., V] float32); k <= 0 or k >= V keeps all."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of highest-probability tokens whose mass reaches p ([..., V]).

    A token is kept when the probability mass strictly above it is < p, so the set always holds
    the most likely token, and holds exactly the smallest prefix (in sorted order) reaching p.
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = _unsort(keep_sorted, order)
    return jnp.where(keep, logits, NEG_INF)


def _unsort(values: jax.Array, order: jax.Array) -> jax.Array:
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(values, inverse, axis=-1)


def reference_filter(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """The reference's filters in bfloat16 on [B, V] logits: top-k keeps every logit >= the k-th
    largest (ties at the k-th value kept); then top-p, on the softmax of the survivors sorted
    descending (stable), keeps a token while the mass before it is <= p. Softmax and cumulative sum
    accumulate in float32 and round to bfloat16, as PyTorch's bf16 kernels do. Returns bf16 [B, V]
    with -inf where dropped."""
    logits = logits.astype(jnp.bfloat16)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits.astype(jnp.float32), axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
        cum = jnp.cumsum(probs.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
        keep = _unsort((cum - probs) <= jnp.bfloat16(top_p), order)
        logits = jnp.where(keep, logits, NEG_INF)
    return logits


def sample(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    reference: bool = False,
) -> jax.Array:
    """Samples token ids [B] int32 from logits [B, V] (float32) with per-row keys rng [B].

    temperature 0 (or top_k 1) is greedy argmax. Filtering order: temperature, top-k, top-p (the
    distribution of `top_p_filter(top_k_filter(...))`). Sampling happens among candidates sorted
    by logit: the top k from `lax.top_k` when top_k is set, else a full sort only when top_p < 1.
    On the 2-core CPU, for [8, 65,536] logits, a full argsort took 140 ms and `lax.top_k(., 1000)`
    4 ms; with top_k set, the vocabulary is never sorted.

    `reference`: the reference's numerics (module docstring): bf16 logits, `reference_filter` over the
    whole vocabulary, and a draw from the bf16 softmax of the survivors; greedy is the argmax of the
    bf16 logits (first index among ties).
    """
    if reference:
        logits = logits.astype(jnp.bfloat16)
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = reference_filter(logits / jnp.bfloat16(temperature), top_k, top_p)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
        choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, jnp.log(probs.astype(jnp.float32)))
        return choice.astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if temperature == 0.0 or top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if 0 < top_k < vocab:
        values, index = jax.lax.top_k(logits, top_k)  # sorted, descending
    elif top_p < 1.0:
        index = jnp.argsort(-logits, axis=-1)
        values = jnp.take_along_axis(logits, index, axis=-1)
    else:
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, logits).astype(jnp.int32)
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, NEG_INF)
    choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, values)
    return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
