"""Text generation with the base decoder and its static KV cache: prefill, then one jitted
`lax.while_loop` of one-token decode steps, greedy or sampled, stopping on stop tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.decode import sampling
from star_jax.models import qwen2


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token rows to one length: (ids [B, T] int32, mask [B, T] bool, True = token)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = True
    return ids, mask


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "num_ids"))
def _generate(
    graphdef, state, embeds, mask, positions, rng, stop_ids, *, max_new_tokens, temperature, top_k, top_p, num_ids
):
    decoder = nnx.merge(graphdef, state)
    b, t = mask.shape
    cache = decoder.init_cache(b, t + max_new_tokens)
    h, cache = decoder.hidden(embeds, positions, cache, attention_mask_2d=mask)
    cache = cache.per_layer()
    layer_params = decoder.stack.per_layer_params()
    logits = decoder.logits(h[:, -1:])[:, 0]
    # Generated tokens continue 1-D after the largest prompt position (M-RoPE: max + 1).
    next_pos = jnp.max(jnp.where(mask[None], positions, 0), axis=(0, 2)) + 1

    def pick(logits, step):
        if num_ids is not None and num_ids < logits.shape[-1]:  # ids the tokenizer has no text for
            logits = jnp.where(jnp.arange(logits.shape[-1]) < num_ids, logits, -jnp.inf)
        keys = jax.vmap(lambda r: jax.random.fold_in(r, step))(rng)
        return sampling.sample(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, pos, out, done = carry
        tok = pick(logits, step)
        tok = jnp.where(done, stop_ids[0], tok)
        out = out.at[:, step].set(tok)
        done = done | jnp.isin(tok, stop_ids)
        h, cache = decoder.hidden(decoder.embed(tok[:, None]), pos[:, None], cache, layer_params=layer_params)
        return step + 1, cache, decoder.logits(h)[:, 0], pos + 1, out, done

    step, _, _, _, out, done = jax.lax.while_loop(cond, body, (0, cache, logits, next_pos, out, done))
    return out, step


def generate_from_embeds(
    decoder: qwen2.Decoder,
    embeds: jax.Array,
    mask: jax.Array,
    positions: jax.Array,
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_ids: int | None = None,
) -> list[list[int]]:
    """Continues left-padded prompts given as embeddings [B, T, D] (mask [B, T] bool, positions
    [3, B, T] int32, e.g. with ViT blocks) by up to `max_new_tokens` tokens each.

    Greedy when temperature is 0; a row stops at its first stop token (kept in the output).
    `num_ids`: only ids below it are drawn (the tokenizer's vocabulary, when the decoder's table is
    larger, as Qwen's padded embedding is). Returns the generated ids per row.
    """
    if not stop_ids:
        raise ValueError("stop_ids must name at least one token")
    rng = jax.random.split(jax.random.key(seed), mask.shape[0])
    graphdef, state = nnx.split(decoder)
    out, steps = _generate(
        graphdef,
        state,
        embeds,
        jnp.asarray(mask),
        jnp.asarray(positions, jnp.int32),
        rng,
        jnp.asarray(stop_ids, jnp.int32),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        num_ids=num_ids,
    )
    out = np.asarray(out)[:, : int(steps)]
    results = []
    for row in out:
        stops = np.nonzero(np.isin(row, stop_ids))[0]
        results.append(row[: stops[0] + 1].tolist() if len(stops) else row.tolist())
    return results


def generate_text(
    decoder: qwen2.Decoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Continues each prompt (token id lists) by up to `max_new_tokens` tokens.

    Greedy when temperature is 0; rows stop at their first stop token (which is kept in the
    output). Returns the generated ids per row, stop token included when one was produced.
    """
    ids, mask = left_pad(prompts, pad_id)
    # Left padding: text positions count real tokens only, as HF does from the attention mask.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    embeds = decoder.embed(jnp.asarray(ids))
    return generate_from_embeds(
        decoder,
        embeds,
        mask,
        np.broadcast_to(positions[None], (3, *positions.shape)),
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
