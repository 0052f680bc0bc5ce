"""Per-stage losses. Each objective is `(model, batch, rng, step) -> (loss f32, metrics dict)`.

  understanding   next-token CE of the base on text targets (answer / caption tokens)
  generation      CE over the codebook on the image tokens after <|vision_start|>
  editing         the same CE, with the source image as VQ block + ViT block in the prompt
  vq              objectives_vq.py

Caption dropout for classifier-free guidance lives here: with probability `caption_dropout` a row
uses `uncond_ids` (the prompt with its caption / instruction replaced by <|fim_pad|>, built by the
input pipeline exactly as the decoder's unconditional row), so that row is in distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean CE and accuracy over positions with targets >= 0.

    logits [..., K] float32, targets [...] int32 (-1 = ignored). Returns (loss, accuracy, count).
    """
    logits = logits.astype(jnp.float32)
    valid = targets >= 0
    safe = jnp.where(valid, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid.sum(), 1)
    loss = jnp.sum(jnp.where(valid, logz - picked, 0.0)) / count
    acc = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == safe, False)) / count
    return loss, acc, count


def drop_captions(batch: dict, rng: jax.Array, rate: float) -> tuple[dict, jax.Array]:
    """Replaces `prompt_ids` by `uncond_ids` on a random `rate` fraction of rows. Returns (batch, dropped [B])."""
    if rate <= 0 or "uncond_ids" not in batch:
        return batch, jnp.zeros(batch["prompt_ids"].shape[:1], bool)
    dropped = jax.random.bernoulli(rng, rate, batch["prompt_ids"].shape[:1])
    ids = jnp.where(dropped[:, None], batch["uncond_ids"], batch["prompt_ids"])
    return {**batch, "prompt_ids": ids}, dropped


def image_codes(model, batch: dict, key: str) -> jax.Array:
    """Image tokens [B, N] int32: pre-tokenised `<key>_codes`, or encoded now by the frozen VQ from
    `<key>_images` [B, H, W, 3] in [-1, 1] (small runs; large runs pre-tokenise)."""
    if f"{key}codes" in batch:
        return batch[f"{key}codes"]
    codes = model.vq.encode_to_codes(batch[f"{key}images"])  # [B, h, w]
    return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))


def understanding_loss(model, batch, rng, step, *, vit_layout=None):
    """Next-token CE of the base over `text_targets` [B, Tp] (-1 = no loss)."""
    logits = model.text_logits(batch, vit_layout)
    loss, acc, count = cross_entropy(logits, batch["text_targets"])
    return loss, {"text_accuracy": acc, "text_tokens": count.astype(jnp.float32)}


def image_token_loss(model, batch, rng, step, *, caption_dropout: float, vit_layout=None):
    """CE over the codebook on every image token (generation and editing)."""
    batch, dropped = drop_captions(batch, rng, caption_dropout)
    codes = image_codes(model, batch, "")
    if "src_mask" in batch and "src_codes" not in batch:
        batch = {**batch, "src_codes": image_codes(model, batch, "src_")}
    logits = model.image_logits(batch, codes, vit_layout)
    loss, acc, _ = cross_entropy(logits, codes)
    return loss, {"image_token_accuracy": acc, "dropped_rows": jnp.mean(dropped.astype(jnp.float32))}
