"""The Qwen2.5 text decoder in Flax NNX: STAR's frozen base and (as N isomorphic layers) its stack.

Pieces: token embedding with a tied or untied output head, RMSNorm, GQA attention with q/k/v bias
(no o bias), RoPE with M-RoPE sections (three position streams; equal streams = plain 1-D RoPE),
SwiGLU MLP, final norm. Layer params are always stored stacked ([num_layers, ...], logical axis
`layers`), so one checkpoint serves both execution modes: `scan_layers=True` runs a `lax.scan`
over them, `False` unrolls a Python loop. A static-shape KV cache supports prefill and one-token
decode; positions are always explicit (text [B, T] or M-RoPE [3, B, T]).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import layers
from star_jax.config_dataclass import dataclass_from_dict
from star_jax.sharding import constrain

# Matmuls are `layers.dot` calls (a custom VJP), so the policies select them by checkpoint name.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.save_only_these_names(layers.DOT, layers.ATTENTION_DOT),  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.save_only_these_names(layers.DOT),  # keep weight matmuls only
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str):
    """The jnp dtype of a config dtype string ('float32', 'bfloat16', 'float16')."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and execution options of a Qwen2.5 decoder (fields of the size table's `decoder` block)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    # False: Qwen2.5-VL's contiguous sections [t | h | w], which leave height and width the lowest
    # frequencies. True: Qwen3-VL's interleaved layout (t, h, w, t, h, w, ...): every axis gets high
    # and low frequencies. No Qwen2.5-VL checkpoint uses it; export refuses it.
    mrope_interleaved: bool = False
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section={self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")

    @classmethod
    def from_dict(cls, d, **overrides) -> DecoderConfig:
        """From a (ConfigDict or plain) mapping; unknown keys raise naming the key."""
        return dataclass_from_dict(cls, d, "decoder", **overrides)


class KVCache(NamedTuple):
    """Static-shape KV cache of a layer stack.

    k, v: [num_layers, B, max_len, num_kv_heads, head_dim] compute dtype; filled slots [0, index).
      In the decode layout (`per_layer()`) each is a tuple of num_layers [B, max_len, kv, hd] arrays.
    key_mask: [B, max_len] bool, False for padding slots (left-padded prompts).
    index: [] int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: DecoderConfig, num_layers: int, batch: int, max_len: int) -> KVCache:
        """An empty cache for `num_layers` layers of `cfg`, `batch` rows, `max_len` slots."""
        shape = (num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = to_dtype(cfg.dtype)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            key_mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def per_layer(self) -> KVCache:
        """The decode layout: k and v as tuples of per-layer arrays, for token loops.

        A stacked cache in a layer scan is sliced (xs) and re-stacked (ys) whole at every token;
        separate per-layer buffers are updated in place, one slot at a time.
        """
        if isinstance(self.k, tuple):
            return self
        return self._replace(k=tuple(self.k), v=tuple(self.v))


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def mrope_streams(mrope_section, interleaved: bool = False) -> np.ndarray:
    """[sum(mrope_section)] int: the position stream (0 t, 1 h, 2 w) of each rotary frequency.

    Contiguous (Qwen2-VL / Qwen2.5-VL): the first mrope_section[0] frequencies (the highest) take
    t, the next mrope_section[1] h, the rest w. Interleaved (Qwen3-VL's `recomposition_frequencies`):
    frequency i takes h when i % 3 == 1 and i < 3 * mrope_section[1], w when i % 3 == 2 and
    i < 3 * mrope_section[2], else t.
    """
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)
    stream = np.zeros(sum(mrope_section), np.int64)
    for axis in (1, 2):
        stream[axis : 3 * mrope_section[axis] : 3] = axis
    return stream


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, mrope_section, interleaved: bool = False
) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, head_dim] float32 for positions [B, T] (1-D) or [3, B, T] (M-RoPE).

    M-RoPE: rotary frequency f takes its position from stream `mrope_streams(...)[f]` (0 temporal,
    1 height, 2 width). With the three streams equal this is exactly 1-D RoPE.
    """
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    stream = mrope_streams(mrope_section, interleaved)  # [head_dim / 2] -> which position stream
    pos = positions.astype(jnp.float32)[stream]  # [head_dim / 2, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, head_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, head_dim] by cos/sin [B, T, head_dim] (rotate-half layout, as HF)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Layers


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v bias and no o bias."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = to_dtype(cfg.param_dtype)
        init = nnx.initializers.normal(stddev=d**-0.5)
        self.q_kernel = layers.param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        self.q_bias = layers.param(rngs, nnx.initializers.zeros, (h, hd), ("heads", "head_dim"), pdt)
        self.k_kernel = layers.param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.k_bias = layers.param(rngs, nnx.initializers.zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
        self.v_kernel = layers.param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_bias = layers.param(rngs, nnx.initializers.zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
        o_init = nnx.initializers.normal(stddev=(h * hd) ** -0.5)
        self.o_kernel = layers.param(rngs, o_init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        self.cfg = cfg

    def _project(self, x, kernel, bias):
        dt = to_dtype(self.cfg.dtype)
        y = layers.dot("btd,dhk->bthk", x, kernel[...], dt, out_dtype=jnp.float32)
        return (y + bias[...].astype(jnp.float32)).astype(dt)

    def __call__(self, x, cos, sin, mask, kv_slice=None, index=None, fused=None):
        """x [B, T, D]; cos/sin [B, T, head_dim]; mask [B, T, S] bool (True = attend).

        Without a cache S = T. With `kv_slice` = (k, v) [B, S, kv_heads, head_dim], the new keys
        and values are written at slot `index` and attention runs over all S slots.
        `fused`: DecoderLayer.fused_weights() (the same params concatenated), for one matmul.
        Returns (out [B, T, D], (k, v) the updated slice or None).
        """
        cfg = self.cfg
        dt = to_dtype(cfg.dtype)
        if fused is None:
            q = self._project(x, self.q_kernel, self.q_bias)
            k = self._project(x, self.k_kernel, self.k_bias)
            v = self._project(x, self.v_kernel, self.v_bias)
        else:  # one matmul for q, k and v (decode)
            y = layers.dot("btd,dn->btn", x, fused["qkv"], dt, out_dtype=jnp.float32)
            y = (y + fused["qkv_bias"].astype(jnp.float32)).astype(dt)
            y = y.reshape(*y.shape[:2], cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
            q, k, v = jnp.split(y, [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "act_heads", None))
        b, t = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
        if kv_slice is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv_slice[0], k.astype(kv_slice[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv_slice[1], v.astype(kv_slice[1].dtype), index, axis=1)
        # Heads before positions, so that each matmul is a plain batched one without transposes
        # of the [T, S] scores: q [B, KV, G, T, hd], k / v [B, KV, S, hd]. A cache stays [B, S, KV,
        # hd] (transposing it would copy the whole cache at every decode step).
        if kv_slice is None:
            kt, vt, kv_spec = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), "bksd"
        else:
            kt, vt, kv_spec = k, v, "bskd"
        out = layers.attention(
            q.transpose(0, 2, 3, 1, 4),
            kt,
            vt,
            mask[:, None, None],
            dt,
            scale=cfg.head_dim**-0.5,
            score_spec=f"bkgtd,{kv_spec}->bkgts",
            value_spec=f"bkgts,{kv_spec}->bkgtd",
        )
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)
        return layers.dot("bthk,hkd->btd", out, self.o_kernel[...], dt), (None if kv_slice is None else (k, v))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.gate = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x, fused=None):
        """x [B, T, D] -> [B, T, D]; `fused` as in Attention (gate and up in one matmul)."""
        if fused is None:
            gate, up = self.gate(x), self.up(x)
        else:
            gate, up = jnp.split(layers.matmul(x, fused["gate_up"], self.gate.dtype), 2, axis=-1)
        h = layers.swiglu(gate, up)
        return self.down(constrain(h, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_eps, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.input_norm = layers.RMSNorm(cfg.hidden_size, **norm_kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = layers.RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def fused_weights(self) -> dict[str, jax.Array]:
        """This layer's q/k/v and gate/up kernels concatenated along their outputs.

        qkv [D, (H + 2 KV) * head_dim], qkv_bias [(H + 2 KV) * head_dim], gate_up [D, 2 F]. Made
        once outside a token loop: at decode the matmuls are weight-bandwidth bound and one wide
        matmul streams the weights faster than three narrow ones (2-core CPU: 15.6 vs 10.6 GiB/s
        for the same 33 MiB in [256, 1536] vs [256, 768] kernels at 8 rows).
        """
        a, m = self.attn, self.mlp
        d = a.cfg.hidden_size
        kernels = [a.q_kernel[...], a.k_kernel[...], a.v_kernel[...]]
        biases = [a.q_bias[...], a.k_bias[...], a.v_bias[...]]
        return {
            "qkv": jnp.concatenate([w.reshape(d, -1) for w in kernels], axis=1),
            "qkv_bias": jnp.concatenate([b.reshape(-1) for b in biases]),
            "gate_up": jnp.concatenate([m.gate.kernel[...], m.up.kernel[...]], axis=1),
        }

    def __call__(self, x, cos, sin, mask, kv_slice=None, index=None, fused=None):
        """x [B, T, D] -> (x [B, T, D], updated (k, v) slice or None); `fused`: fused_weights()."""
        attn_out, kv_slice = self.attn(self.input_norm(x), cos, sin, mask, kv_slice, index, fused)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), fused)
        return constrain(x, ("batch", "length", "act_embed")), kv_slice


def attention_mask(
    t: int,
    *,
    segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    index: jax.Array | None = None,
    batch: int = 1,
) -> jax.Array:
    """Boolean attention mask [B, T, S].

    Without a cache (`key_mask` None): causal over T, optionally within equal `segment_ids` [B, T]
    (packed sequences; segment 0 = padding attends to nothing useful). With a cache: `key_mask`
    [B, S] marks valid slots (already updated for this call) and query i sits at slot index + i.
    """
    if key_mask is None:
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return jnp.broadcast_to(mask, (segment_ids.shape[0] if segment_ids is not None else batch, t, t))
    s = key_mask.shape[1]
    causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
    return causal[None] & key_mask[:, None, :]


class LayerStack(nnx.Module):
    """`num_layers` decoder layers (params stacked on a leading `layers` axis) and a final norm.

    This is the whole body of the base decoder and, with its own depth, STAR's stacked AR.
    """

    def __init__(self, cfg: DecoderConfig, num_layers: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = layers.RMSNorm(
            cfg.hidden_size,
            eps=cfg.rms_eps,
            dtype=to_dtype(cfg.dtype),
            param_dtype=to_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.cfg = cfg
        self.num_layers = num_layers

    def per_layer_params(self, *, fuse: bool | None = None) -> tuple:
        """Per layer: (its params sliced from the stack, its DecoderLayer.fused_weights() or None).

        For token loops, made once outside the loop: XLA:CPU did not hoist the weight slices out
        of it, and re-slicing every layer at every token took 45 % of the shapes size's decode
        time. `fuse` (default: on the CPU backend only) adds a concatenated copy of q/k/v and
        gate/up (extra memory: those weights once more) for wider, faster-streaming matmuls.
        """
        if fuse is None:
            fuse = jax.default_backend() == "cpu"
        graphdef, state = nnx.split(self.layers)
        out = []
        for i in range(self.num_layers):
            layer_state = jax.tree.map(lambda a, i=i: a[i], state)
            out.append((layer_state, nnx.merge(graphdef, layer_state).fused_weights() if fuse else None))
        return tuple(out)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        cache: KVCache | None = None,
        attention_mask_2d: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        layer_params: tuple | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the layers and the final norm.

        Args:
          x: [B, T, D] input embeddings / hidden states (any float dtype; cast to compute dtype).
          positions: [B, T] or [3, B, T] int32 rotary positions.
          cache: optional KVCache; the T new tokens are written at `cache.index`.
          attention_mask_2d: optional [B, T] bool/int, 0 = padding token (with a cache: stored in
            the cache's key mask; without: combined with causal masking).
          segment_ids: optional [B, T] int32 for packed sequences (no cache).
          layer_params: with a decode-layout cache (`KVCache.per_layer()`), `per_layer_params()`
            made outside the token loop (else the weights are sliced again at every token).
        Returns:
          (final-normed hidden [B, T, D] compute dtype, updated cache or None).
        """
        cfg = self.cfg
        b, t = x.shape[:2]
        x = constrain(x.astype(to_dtype(cfg.dtype)), ("batch", "length", "act_embed"))
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
        valid = jnp.ones((b, t), bool) if attention_mask_2d is None else attention_mask_2d.astype(bool)
        if cache is None:
            if segment_ids is None and attention_mask_2d is not None:
                segment_ids = valid.astype(jnp.int32)
            mask = attention_mask(t, segment_ids=segment_ids, batch=b)
            index = None
        else:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, valid, index, axis=1)
            mask = attention_mask(t, key_mask=key_mask, index=index)

        graphdef, state = nnx.split(self.layers)

        def body(h, xs, fused=None):
            layer_state, kv = xs
            h, kv = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, kv, index, fused)
            return h, kv

        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
        kv_all = None if cache is None else (cache.k, cache.v)
        if cache is not None and isinstance(cache.k, tuple):
            # Decode layout: unrolled, each layer's cache buffer updated in place.
            layer_params = layer_params or self.per_layer_params(fuse=False)
            outs = []
            for i in range(self.num_layers):
                layer_state, fused = layer_params[i]
                x, kv = body(x, (layer_state, (cache.k[i], cache.v[i])), fused)
                outs.append(kv)
            kv_all = (tuple(k for k, _ in outs), tuple(v for _, v in outs))
        elif cfg.scan_layers:
            x, kv_all = jax.lax.scan(body, x, (state, kv_all))
        else:
            outs = []
            for i in range(self.num_layers):
                x, kv = body(x, jax.tree.map(lambda a, i=i: a[i], (state, kv_all)))
                outs.append(kv)
            kv_all = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        x = self.final_norm(x)
        if cache is not None:
            cache = KVCache(k=kv_all[0], v=kv_all[1], key_mask=key_mask, index=cache.index + t)
        return x, cache


class Decoder(nnx.Module):
    """Qwen2.5 causal LM: embedding -> LayerStack -> output head (tied or untied)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        pdt = to_dtype(cfg.param_dtype)
        self.embedding = layers.param(
            rngs, nnx.initializers.normal(stddev=0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt
        )
        self.stack = LayerStack(cfg, cfg.num_layers, rngs=rngs)
        if not cfg.tie_embeddings:
            init = nnx.initializers.normal(stddev=cfg.hidden_size**-0.5)
            self.lm_head = layers.param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
        self.cfg = cfg

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] int32 -> embeddings [B, T, D] compute dtype."""
        return jnp.take(self.embedding[...], input_ids, axis=0).astype(to_dtype(self.cfg.dtype))

    def hidden(self, inputs_embeds: jax.Array, positions: jax.Array, cache: KVCache | None = None, **kw):
        """Embeddings [B, T, D] -> (final-normed hidden [B, T, D], cache). See LayerStack."""
        return self.stack(inputs_embeds, positions, cache=cache, **kw)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] -> logits [B, T, V] float32 (bf16 inputs, f32 accumulation)."""
        dt = to_dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            out = layers.dot("btd,vd->btv", hidden, self.embedding[...], dt, out_dtype=jnp.float32)
        else:
            out = layers.dot("btd,dv->btv", hidden, self.lm_head[...], dt, out_dtype=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, **kw) -> jax.Array:
        """input_ids [B, T] int32 (positions [B, T] or [3, B, T], default 0..T-1) -> logits [B, T, V] f32."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        h, _ = self.hidden(self.embed(input_ids), positions, **kw)
        return self.logits(h)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for this decoder."""
        return KVCache.init(self.cfg, self.cfg.num_layers, batch, max_len)
