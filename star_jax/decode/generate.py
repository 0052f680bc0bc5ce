"""Compiled CFG decoding of image tokens: prefill, then one `lax.scan` over the N image tokens
with two static KV caches (base and stack), CFG pairs folded into the batch.

Rows 2i / 2i + 1 are the conditional / unconditional versions of prompt i (STAR_SPEC section 3).
Each step combines their float32 logits as u + w (c - u), filters (temperature, top-k, top-p),
samples one token per pair with the pair's own PRNG key, and feeds adapter(codebook[token]) to
both rows (with `reference_numerics`, head logits, CFG and filters are bfloat16 as the reference's:
`sampling`). Every row's prompt is laid out by `star_jax.sequences` (text-to-image, editing,
implicit reasoning all decode here).
The base re-encodes every generated token; its final-normed output feeds the stack.
Inside the loop the caches are in the decode layout (`KVCache.per_layer()`: one buffer per
layer, updated in place) and each layer's weights are sliced (on CPU also fused) once per call,
before the loop (`LayerStack.per_layer_params`). `cfg_mode="two_pass"` runs the conditional and
unconditional rows as two half-size passes (separate caches) for when 2n rows do not fit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.decode import sampling
from star_jax.models import qwen2, vision
from star_jax.models.star import Star, _streams


def _pair_rows(batch: dict) -> dict:
    """[n, ...] prompt arrays with cond (`prompt_ids`) and uncond (`uncond_ids`) -> [2n, ...] rows."""
    out = {}
    for key, value in batch.items():
        if key in ("uncond_ids", "seeds"):
            continue
        if key == "prompt_ids":
            value = jnp.stack([batch["prompt_ids"], batch["uncond_ids"]], axis=1)
        else:
            value = jnp.repeat(value[:, None], 2, axis=1)
        out[key] = value.reshape(-1, *value.shape[2:])
    return out


class _Runner:
    """Prefill and one-token steps of base + stack + head with explicit caches."""

    def __init__(self, model: Star, batch: dict, num_tokens: int, vit_grid, logit_dtype=jnp.float32):
        self.model, self.logit_dtype = model, logit_dtype
        self.batch = batch
        self.tp = batch["prompt_ids"].shape[1]
        self.positions = _streams(batch["positions"])  # [3, R, Tp + N]
        cfg = model.decoder_cfg
        rows = batch["prompt_ids"].shape[0]
        max_len = self.tp + num_tokens
        self.base_cache = qwen2.KVCache.init(cfg, cfg.num_layers, rows, max_len)
        self.stack_cache = qwen2.KVCache.init(cfg, model.star_cfg.stack_layers, rows, max_len)
        self.vit_layout = None
        if vit_grid is not None:  # one source image per row, all of grid (t, h, w)
            self.vit_layout = vision.vision_layout(np.tile([vit_grid], (rows, 1)), model.vision_cfg)
        # Sliced (and on CPU fused) here, outside the token loop, once per call.
        self.base_layers = model.base.stack.per_layer_params()
        self.stack_layers = model.stacked_ar.per_layer_params()

    def prefill(self):
        m, b = self.model, self.batch
        x = m.embed_prompt(b, self.vit_layout)
        pos = self.positions[:, :, : self.tp]
        h, base_cache = m.base.hidden(x, pos, self.base_cache, attention_mask_2d=b["prompt_mask"])
        h, stack_cache = m.stacked_ar(h, pos, cache=self.stack_cache, attention_mask_2d=b["prompt_mask"])
        return m.image_head(h[:, -1]).astype(self.logit_dtype), (base_cache.per_layer(), stack_cache.per_layer())

    def step(self, tokens, j, caches):
        """tokens [R] fed at image position j -> logits [R, K] for position j + 1."""
        m = self.model
        x = m.embed_codes(tokens[:, None])
        pos = jax.lax.dynamic_slice_in_dim(self.positions, self.tp + j, 1, axis=2)
        h, base_cache = m.base.hidden(x, pos, caches[0], layer_params=self.base_layers)
        h, stack_cache = m.stacked_ar(h, pos, cache=caches[1], layer_params=self.stack_layers)
        return m.image_head(h[:, 0]).astype(self.logit_dtype), (base_cache, stack_cache)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "num_tokens",
        "temperature",
        "top_k",
        "top_p",
        "cfg_mode",
        "return_logits",
        "vit_grid",
        "reference_numerics",
    ),
)
def _decode(
    graphdef,
    state,
    batch,
    cfg_weight,
    *,
    num_tokens,
    temperature,
    top_k,
    top_p,
    cfg_mode,
    return_logits,
    vit_grid,
    reference_numerics,
):
    model = nnx.merge(graphdef, state)
    dtype = jnp.bfloat16 if reference_numerics else jnp.float32
    n = batch["prompt_ids"].shape[0]
    keys = jax.vmap(jax.random.key)(batch["seeds"])  # one key per image

    if cfg_mode == "fold":
        runner = _Runner(model, _pair_rows(batch), num_tokens, vit_grid, dtype)
        logits, caches = runner.prefill()

        def split(logits):
            pair = logits.reshape(n, 2, -1)
            return pair[:, 0], pair[:, 1]

        def feed(tokens, j, caches):
            return runner.step(jnp.repeat(tokens, 2), j, caches)

    elif cfg_mode == "two_pass":
        cond_batch = {k: v for k, v in batch.items() if k not in ("uncond_ids", "seeds")}
        uncond_batch = {**cond_batch, "prompt_ids": batch["uncond_ids"]}
        runners = (
            _Runner(model, cond_batch, num_tokens, vit_grid, dtype),
            _Runner(model, uncond_batch, num_tokens, vit_grid, dtype),
        )
        (lc, cc), (lu, cu) = runners[0].prefill(), runners[1].prefill()
        logits, caches = jnp.stack([lc, lu]), (cc, cu)

        def split(logits):
            return logits[0], logits[1]

        def feed(tokens, j, caches):
            (lc, cc), (lu, cu) = runners[0].step(tokens, j, caches[0]), runners[1].step(tokens, j, caches[1])
            return jnp.stack([lc, lu]), (cc, cu)

    else:
        raise ValueError(f"cfg_mode={cfg_mode!r} is not 'fold' or 'two_pass'")

    def body(carry, j):
        logits, caches = carry
        cond, uncond = split(logits)
        guided = sampling.cfg_combine(cond, uncond, cfg_weight, reference=reference_numerics)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, j))(keys)
        tokens = sampling.sample(
            guided, step_keys, temperature=temperature, top_k=top_k, top_p=top_p, reference=reference_numerics
        )
        logits, caches = feed(tokens, j, caches)
        return (logits, caches), (tokens, cond if return_logits else None)

    _, (tokens, cond_logits) = jax.lax.scan(body, (logits, caches), jnp.arange(num_tokens))
    tokens = tokens.T  # [n, N]
    return tokens, (None if cond_logits is None else jnp.swapaxes(cond_logits, 0, 1))


def generate_codes(
    model: Star,
    batch: dict,
    *,
    num_tokens: int,
    cfg_weight: float = 3.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_mode: str = "fold",
    return_logits: bool = False,
    vit_grid: tuple[int, int, int] | None = None,
    reference_numerics: bool = False,
):
    """Draws `num_tokens` image tokens for each of n prompts.

    Args:
      model: a STAR model with base, stacked_ar, pixel_adapter, image_head and vq (codebook).
      batch: n prompts as built by `star_jax.sequences` (prompt_ids, uncond_ids, prompt_mask
        [n, Tp]; positions [n, 3, Tp + N]; optional vit_mask / pixels / src_mask / src_codes) and
        `seeds` [n] int32 (one PRNG stream per image).
      vit_grid: the (t, h, w) patch grid of the source image when the prompts hold ViT slots.
      cfg_weight: guidance weight w in u + w (c - u); 1 gives the conditional logits.
      temperature: 0 (or top_k 1) is greedy.
      reference_numerics: head logits, CFG, softmax and filters in bfloat16 with the reference's tie
        and boundary rules (`sampling.sample(reference=True)`); default float32.
    Returns:
      codes [n, N] int32, and (when return_logits) the conditional logits [n, N, K] (float32, or
      bfloat16 with reference_numerics).
    """
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    codes, logits = _decode(
        graphdef,
        state,
        batch,
        jnp.float32(cfg_weight),
        num_tokens=num_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        cfg_mode=cfg_mode,
        return_logits=return_logits,
        vit_grid=None if vit_grid is None else tuple(int(v) for v in vit_grid),
        reference_numerics=bool(reference_numerics),
    )
    return (codes, logits) if return_logits else codes
