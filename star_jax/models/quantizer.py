"""STAR-VQ vector quantizer: nearest code by squared L2, straight-through estimator, losses, usage.

Pure functions do the work (`nearest_codes`, `quantize`, `entropy_loss`, `codebook_usage`,
`perplexity`, `reseed_dead_codes`); `VectorQuantizer` is the NNX module holding the codebook
(`embedding` [K, D], logical axes (`codebook`, `codebook_dim`)) and the reference's rolling
buffer of recently used code indices (`codebook_used` [usage_window] float32, -1 = empty slot).

Memory: the distance matrix [N tokens, K codes] is never built whole when `chunk_size < K`: the
search scans the codebook in chunks keeping a running (min, argmin). When the codebook is
sharded along the `codebook` logical axis (mesh axes of size > 1 under the rules in context),
each device searches its own slice (chunked) inside `shard_map`, and the per-shard winners are
combined; ties resolve to the lowest index everywhere, so all paths return the same codes as a
plain `argmin` over the full matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

from star_jax import layers, sharding


class CodebookUsage(nnx.Variable):
    """Rolling window of recently used code indices (float32, -1 = empty); not trained."""


class QuantizerOutput(NamedTuple):
    """Result of `quantize`.

    z_q: [..., D] float32, straight-through: value = codebook[indices], gradient w.r.t. z = identity.
    indices: [...] int32 code ids.
    codebook_loss: [] float32 mean((z_q - sg(z))^2) (trains the codebook).
    commit_loss: [] float32 beta * mean((sg(z_q) - z)^2) (trains the encoder).
    entropy_loss: [] float32 entropy_weight * (sample entropy - batch entropy); 0 when the weight is 0.
    """

    z_q: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array
    commit_loss: jax.Array
    entropy_loss: jax.Array


def _l2_normalize(x: jax.Array) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _chunk_distances(z: jax.Array, z_sq: jax.Array, codes: jax.Array) -> jax.Array:
    """Squared L2 distances [N, C] float32 of z [N, D] f32 to codes [C, D] f32 (reference formula)."""
    e_sq = jnp.sum(codes * codes, axis=-1)
    dots = jnp.einsum("nd,cd->nc", z, codes, preferred_element_type=jnp.float32)
    return z_sq[:, None] + e_sq[None, :] - 2.0 * dots


def _local_nearest(z: jax.Array, codebook: jax.Array, chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
    """(indices [N] int32, min distances [N] f32) of z [N, D] over codebook [K, D], chunked over K."""
    k = codebook.shape[0]
    z_sq = jnp.sum(z * z, axis=-1)
    if chunk_size is None or chunk_size >= k:
        d = _chunk_distances(z, z_sq, codebook)
        idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
        return idx, jnp.take_along_axis(d, idx[:, None], axis=-1)[:, 0]
    if k % chunk_size:
        raise ValueError(f"quantizer chunk_size={chunk_size} must divide the (per-shard) codebook size {k}")
    chunks = codebook.reshape(k // chunk_size, chunk_size, codebook.shape[-1])

    def body(carry, xs):
        best_d, best_i = carry
        codes, offset = xs
        d = _chunk_distances(z, z_sq, codes)
        i = jnp.argmin(d, axis=-1).astype(jnp.int32)
        m = jnp.take_along_axis(d, i[:, None], axis=-1)[:, 0]
        better = m < best_d  # strict: an earlier chunk keeps ties, as argmin does
        return (jnp.where(better, m, best_d), jnp.where(better, i + offset, best_i)), None

    init = (jnp.full(z.shape[:1], jnp.inf, jnp.float32), jnp.zeros(z.shape[:1], jnp.int32))
    offsets = jnp.arange(0, k, chunk_size, dtype=jnp.int32)
    (best_d, best_i), _ = jax.lax.scan(body, init, (chunks, offsets))
    return best_i, best_d


def _mesh_axes(logical: str) -> tuple[tuple[str, ...], int]:
    """Mesh axes (and their total size) that `logical` maps to under the mesh and rules in context."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh is None or mesh.empty or not rules:
        return (), 1
    axes = dict(rules).get(logical)
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    return axes, math.prod(mesh.shape[a] for a in axes)


def nearest_codes(z: jax.Array, codebook: jax.Array, chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Nearest code by squared L2, `||z||^2 + ||e||^2 - 2 z.e` in float32, lowest index on ties.

    Args:
      z: [N, D] float (cast to float32).
      codebook: [K, D] float (cast to float32).
      chunk_size: codes per distance block (None = all K at once); must divide K (per shard).
    Returns:
      indices [N] int32, distances [N] float32.
    When the `codebook` logical axis maps to mesh axes of size > 1 (under `sharding.use_mesh`),
    each shard searches its K / S codes and the winners are combined across shards.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    code_axes, shards = _mesh_axes("codebook")
    if shards == 1:
        return _local_nearest(z, codebook, chunk_size)
    k = codebook.shape[0]
    if k % shards:
        raise ValueError(f"codebook size {k} is not divisible by the {shards} shards of mesh axes {code_axes}")
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in _mesh_axes("batch")[0] if a not in code_axes)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    z_spec = P(batch_axes or None) if batch_axes and z.shape[0] % batch_shards == 0 else P()

    def per_shard(z_local, codes_local):
        idx, dist = _local_nearest(z_local, codes_local, chunk_size)
        idx = idx + jax.lax.axis_index(code_axes) * codes_local.shape[0]
        all_d = jax.lax.all_gather(dist, code_axes)  # [S, n], shard order = index order
        all_i = jax.lax.all_gather(idx, code_axes)
        winner = jnp.argmin(all_d, axis=0)  # first shard on ties = lowest index
        return (
            jnp.take_along_axis(all_i, winner[None], axis=0)[0],
            jnp.take_along_axis(all_d, winner[None], axis=0)[0],
        )

    fn = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(z_spec, P(code_axes, None)),
        out_specs=(z_spec, z_spec),
        check_vma=False,
    )
    return fn(z, codebook)


def entropy_loss(z: jax.Array, codebook: jax.Array, temperature: float, chunk_size: int | None = None) -> jax.Array:
    """LlamaGen's codebook entropy loss over affinities -d / temperature, chunked over K.

    loss = mean_n H(p_n) - H(mean_n p_n), p_n = softmax_k(-d[n, k] / temperature), with the
    reference's `log(avg_p + 1e-5)`. z: [N, D], codebook: [K, D]; returns [] float32.
    Two passes over codebook chunks (log-sum-exp, then probabilities): no [N, K] matrix is kept.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    k = codebook.shape[0]
    chunk_size = k if chunk_size is None or chunk_size >= k else chunk_size
    if k % chunk_size:
        raise ValueError(f"quantizer chunk_size={chunk_size} must divide codebook_size={k}")
    chunks = codebook.reshape(k // chunk_size, chunk_size, -1)
    z_sq = jnp.sum(z * z, axis=-1)

    def affinity(codes):
        return -_chunk_distances(z, z_sq, codes) / temperature

    def lse_body(carry, codes):
        m, s = carry
        a = affinity(codes)
        m_new = jnp.maximum(m, jnp.max(a, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(a - m_new[:, None]), axis=-1)
        return (m_new, s), None

    n = z.shape[0]
    (m, s), _ = jax.lax.scan(lse_body, (jnp.full((n,), -jnp.inf), jnp.zeros((n,))), chunks)
    lse = m + jnp.log(s)

    def prob_body(sample_h, codes):
        logp = affinity(codes) - lse[:, None]
        p = jnp.exp(logp)
        return sample_h - jnp.sum(p * logp) / n, jnp.mean(p, axis=0)

    sample_entropy, avg_p = jax.lax.scan(prob_body, jnp.zeros(()), chunks)
    avg_p = avg_p.reshape(-1)
    avg_entropy = -jnp.sum(avg_p * jnp.log(avg_p + 1e-5))
    return sample_entropy - avg_entropy


def quantize(
    z: jax.Array,
    codebook: jax.Array,
    *,
    beta: float = 0.25,
    l2_norm: bool = False,
    entropy_weight: float = 0.0,
    entropy_temperature: float = 0.01,
    chunk_size: int | None = None,
) -> QuantizerOutput:
    """Quantizes z [..., D] (any float dtype) with codebook [K, D]; see `QuantizerOutput`.

    With `l2_norm`, z and the codes are l2-normalised before the search and z_q is a normalised
    code. All losses are computed in float32.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    if l2_norm:
        z, codebook = _l2_normalize(z), _l2_normalize(codebook)
    flat = z.reshape(-1, z.shape[-1])
    indices, _ = nearest_codes(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(codebook), chunk_size)
    z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape)
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    commit_loss = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    if entropy_weight:
        ent = entropy_weight * entropy_loss(flat, codebook, entropy_temperature, chunk_size)
    else:
        ent = jnp.zeros((), jnp.float32)
    z_q_st = z + jax.lax.stop_gradient(z_q - z)
    return QuantizerOutput(z_q_st, indices.reshape(z.shape[:-1]), codebook_loss, commit_loss, ent)


def update_usage_buffer(buffer: jax.Array, indices: jax.Array) -> jax.Array:
    """Appends flattened `indices` to the rolling window `buffer` [W] float32 (oldest dropped)."""
    new = indices.reshape(-1).astype(buffer.dtype)
    w = buffer.shape[0]
    if new.shape[0] >= w:
        return new[-w:]
    return jnp.concatenate([buffer[new.shape[0] :], new])


def code_counts(buffer: jax.Array, codebook_size: int) -> jax.Array:
    """How often each code occurs in the usage window: [K] int32 (-1 slots ignored)."""
    idx = buffer.astype(jnp.int32)
    idx = jnp.where(idx >= 0, idx, codebook_size)
    return jnp.bincount(idx, length=codebook_size + 1)[:codebook_size].astype(jnp.int32)


def codebook_usage(buffer: jax.Array, codebook_size: int) -> jax.Array:
    """Fraction of the K codes that occur in the usage window: [] float32."""
    return jnp.mean((code_counts(buffer, codebook_size) > 0).astype(jnp.float32))


def perplexity(indices: jax.Array, codebook_size: int) -> jax.Array:
    """exp(entropy) of the code histogram of `indices` (any shape, int): [] float32, in [1, K]."""
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def reseed_dead_codes(
    codebook: jax.Array,
    buffer: jax.Array,
    z: jax.Array,
    key: jax.Array,
    *,
    min_count: int = 1,
    noise: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Re-seeds codes seen fewer than `min_count` times in the usage window with recent encoder outputs.

    Args:
      codebook: [K, D] param value.
      buffer: [W] usage window (`codebook_used`); call only once it is full, or every code with no
        history counts as dead.
      z: [N, D] recent (pre-quantisation) encoder outputs; each dead code gets a random row of z,
        plus Gaussian noise of std `noise` times that row's RMS when `noise` > 0.
      key: PRNG key.
    Returns:
      (new codebook [K, D] in codebook.dtype, number of re-seeded codes [] int32).
    """
    k = codebook.shape[0]
    dead = code_counts(buffer, k) < min_count
    pick_key, noise_key = jax.random.split(key)
    rows = jax.random.randint(pick_key, (k,), 0, z.shape[0])
    seeds = jnp.take(z.astype(jnp.float32), rows, axis=0)
    if noise:
        rms = jnp.sqrt(jnp.mean(jnp.square(seeds), axis=-1, keepdims=True))
        seeds = seeds + noise * rms * jax.random.normal(noise_key, seeds.shape)
    seeds = sharding.constrain(seeds, ("codebook", "codebook_dim"))
    new = jnp.where(dead[:, None], seeds.astype(codebook.dtype), codebook)
    return new, jnp.sum(dead).astype(jnp.int32)


class VectorQuantizer(nnx.Module):
    """Codebook `embedding` [K, D] (`codebook`, `codebook_dim`) + `codebook_used` window [W] float32.

    Initialised as the reference: embedding uniform(-1/K, 1/K); with `l2_norm`, rows are normalised
    at init as well.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        k, d = cfg.codebook_size, cfg.codebook_dim
        init = nnx.initializers.uniform(scale=2.0 / k)
        self.embedding = layers.param(rngs, init, (k, d), ("codebook", "codebook_dim"), jnp.float32)
        self.embedding[...] = self.embedding[...] - 1.0 / k
        if cfg.l2_norm:
            self.embedding[...] = _l2_normalize(self.embedding[...])
        self.codebook_used = CodebookUsage(jnp.full((cfg.usage_window_size,), -1.0, jnp.float32), sharding=(None,))
        self.cfg = cfg

    def __call__(self, z: jax.Array, *, update_usage: bool = False) -> QuantizerOutput:
        """z [..., D] (any float dtype) -> QuantizerOutput; `update_usage` appends the codes to the window."""
        cfg = self.cfg
        out = quantize(
            z,
            self.embedding[...],
            beta=cfg.beta,
            l2_norm=cfg.l2_norm,
            entropy_weight=cfg.entropy_weight,
            entropy_temperature=cfg.entropy_temperature,
            chunk_size=cfg.chunk_size,
        )
        if update_usage:
            self.codebook_used[...] = update_usage_buffer(self.codebook_used[...], out.indices)
        return out

    def codebook(self) -> jax.Array:
        """The code vectors used for lookups [K, D] float32 (normalised when l2_norm)."""
        e = self.embedding[...].astype(jnp.float32)
        return _l2_normalize(e) if self.cfg.l2_norm else e

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors of integer `indices` [...] -> [..., D] float32."""
        return jnp.take(self.codebook(), indices, axis=0)

    def usage_metrics(self, indices: jax.Array | None = None) -> dict[str, jax.Array]:
        """`codebook_usage` over the window, and `perplexity` of `indices` when given."""
        out = {"codebook_usage": codebook_usage(self.codebook_used[...], self.cfg.codebook_size)}
        if indices is not None:
            out["perplexity"] = perplexity(indices, self.cfg.codebook_size)
        return out

    def reseed_dead(self, z: jax.Array, key: jax.Array, *, min_count: int = 1, noise: float = 0.0) -> jax.Array:
        """In place `reseed_dead_codes` from encoder outputs z [..., D]; returns the number re-seeded."""
        new, n = reseed_dead_codes(
            self.embedding[...],
            self.codebook_used[...],
            z.reshape(-1, z.shape[-1]),
            key,
            min_count=min_count,
            noise=noise,
        )
        self.embedding[...] = new
        return n
