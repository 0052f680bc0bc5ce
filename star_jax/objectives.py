"""Per-stage losses. Each objective is `(model, batch, rng, step) -> (loss f32, metrics dict)`.

  vision          sigmoid CE of the ViT's caption-word classifier (which words the caption holds),
                  or (data.vision_labels='scene_cells' | 'scene_cover') CE of each ViT token's shape and colour
  understanding   next-token CE of the base on text targets (answer / caption tokens)
  generation      CE over the codebook on the image tokens after <|vision_start|>
  editing         the same CE, with the source image as VQ block + ViT block in the prompt
  vq              see objectives_vq.py

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


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multi-label CE (big_vision's `sigmoid_xent`): summed over classes, averaged over rows.
    logits, labels [B, K] (labels in {0, 1}); returns a float32 scalar."""
    return jnp.mean(sigmoid_cross_entropy_rows(logits, labels))


def sigmoid_cross_entropy_rows(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multi-label CE of each row, summed over classes: logits, labels [..., K] -> [...] float32.
    A negative label marks a class the row does not supervise (no loss)."""
    logits, labels = logits.astype(jnp.float32), labels.astype(jnp.float32)
    per_class = labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits)
    return -jnp.sum(jnp.where(labels >= 0, per_class, 0.0), axis=-1)


def caption_words_loss(model, batch, rng, step, *, vit_layout=None):
    """Vision stage: which vocabulary words the image's caption holds, from the mean ViT token.

    Metrics at threshold 1/2: recall and precision over (row, word) pairs, and the fraction of
    rows whose predicted word set equals the caption's exactly."""
    logits = model.caption_word_logits(batch, vit_layout)
    labels = batch["caption_words"]
    loss = sigmoid_cross_entropy(logits, labels)
    predicted, truth = logits > 0, labels > 0.5
    hits = jnp.sum(predicted & truth)
    return loss, {
        "word_recall": hits / jnp.maximum(jnp.sum(truth), 1),
        "word_precision": hits / jnp.maximum(jnp.sum(predicted), 1),
        "word_set_exact": jnp.mean(jnp.all(predicted == truth, axis=-1).astype(jnp.float32)),
    }


def scene_cells_loss(model, batch, rng, step, *, vit_layout=None):
    """Vision stage on the shapes world: per merged ViT token, CE of the shape and of the colour of
    the object labelling its cell (0 = none), summed and averaged over tokens; with `cell_centre`
    [B, N, 2] in the batch (data.scene_centres), + the squared error of that object's centre (in
    cells), averaged over the labelled cells; with `cell_relations` [B, N, K] (data.scene_relations),
    + the sigmoid CE of each relation bit (but those labelled -1: relations no question asks),
    summed over bits and averaged over the labelled cells; with `cell_counts` [B, N, 3]
    (data.scene_counts), + the mean CE of the scene's object count (every cell) and the mean CE of
    the two counts of the cell's object (same shape; same shape and colour; labelled cells).

    Metrics: shape / colour accuracy over the labelled cells, the fraction of images whose every
    cell (empty or not) is labelled right, the centre's mean absolute error (cells), and the relation
    bits' recall and precision (threshold 1/2, labelled cells, supervised bits), and the counts'
    accuracy (scene count over all cells; object counts over labelled cells)."""
    out = model.cell_logits(batch, vit_layout)
    shape_logits, color_logits, centre, relation_logits = out["shape"], out["color"], out["centre"], out["relations"]
    shape_loss, _, _ = cross_entropy(shape_logits, batch["cell_shape"])
    color_loss, _, _ = cross_entropy(color_logits, batch["cell_color"])
    occupied = batch["cell_shape"] > 0
    shape_ok = jnp.argmax(shape_logits, -1) == batch["cell_shape"]
    color_ok = jnp.argmax(color_logits, -1) == batch["cell_color"]
    n = jnp.maximum(occupied.sum(), 1)
    metrics = {
        "cell_shape_accuracy": jnp.sum(shape_ok & occupied) / n,
        "cell_color_accuracy": jnp.sum(color_ok & occupied) / n,
        "scene_exact": jnp.mean(jnp.all(shape_ok & color_ok, axis=-1).astype(jnp.float32)),
    }
    loss = shape_loss + color_loss
    if "cell_centre" in batch:
        error = (centre - batch["cell_centre"]) * occupied[..., None]
        loss = loss + jnp.sum(jnp.square(error)) / n
        metrics["cell_centre_error"] = jnp.sum(jnp.abs(error)) / (2 * n)
    if "cell_relations" in batch:
        labels = batch["cell_relations"]
        loss = loss + jnp.sum(sigmoid_cross_entropy_rows(relation_logits, labels) * occupied) / n
        known = occupied[..., None] & (labels >= 0)
        predicted, truth = (relation_logits > 0) & known, labels > 0.5
        metrics["relation_recall"] = jnp.sum(predicted & truth) / jnp.maximum(jnp.sum(truth), 1)
        metrics["relation_precision"] = jnp.sum(predicted & truth) / jnp.maximum(jnp.sum(predicted), 1)
    if "cell_counts" in batch:
        labels = batch["cell_counts"]
        scene_loss, scene_ok, _ = cross_entropy(out["counts"][..., 0, :], labels[..., 0])
        object_labels = jnp.where(occupied[..., None], labels[..., 1:], -1)
        object_loss, object_ok, _ = cross_entropy(out["counts"][..., 1:, :], object_labels)
        loss = loss + scene_loss + object_loss
        metrics["scene_count_accuracy"] = scene_ok
        metrics["object_count_accuracy"] = object_ok
    return loss, metrics


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


def vq_loss(model, batch, rng, step, *, cfg, perceptual=None):
    """VQ stage: L2 + quantizer losses (+ perceptual) + PatchGAN hinge, in one loss.

    The generator's adversarial term sees the discriminator through stop_gradient, and the
    discriminator's hinge loss sees stop_gradient(reconstructions), so one gradient of the sum
    updates each network by its own objective (a simultaneous GAN step, one optimizer).
    """
    from flax import nnx

    from star_jax import objectives_vq

    images = batch["images"]
    vq = model.vq
    q = vq.encode(images, update_usage=True)
    features = vq.decoder.features(vq.post_quant_conv(q.z_q))
    recon = vq.decoder.head(features).astype(jnp.float32)  # = vq(images)[0], keeping the features
    logits_fake_g, adaptive = None, 1.0
    use_disc = hasattr(model, "discriminator") and cfg.disc_weight > 0
    if use_disc:
        graphdef, state = nnx.split(model.discriminator)
        frozen_disc = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        logits_fake_g = frozen_disc(recon)
        if cfg.get("disc_adaptive", False):
            head = lambda w: vq.decoder.head(features, w).astype(jnp.float32)

            def rec_loss_of(w):  # LlamaGen's "nll" term: reconstruction + perceptual
                out = head(w)
                rec = cfg.l2 * objectives_vq.l2_reconstruction(images, out)
                return rec + (cfg.perceptual * perceptual(images, out) if perceptual is not None else 0.0)

            adaptive = objectives_vq.adaptive_gan_weight(
                rec_loss_of,
                lambda w: objectives_vq.hinge_generator_loss(frozen_disc(head(w))),
                vq.decoder.conv_out.kernel[...],
            )
    total, parts = objectives_vq.vq_generator_loss(
        images,
        recon,
        q,
        logits_fake_g,
        step,
        l2_weight=cfg.l2,
        perceptual=perceptual,
        perceptual_weight=cfg.perceptual,
        disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
        adaptive_weight=adaptive,
    )
    if use_disc:
        parts["disc_adaptive_weight"] = jnp.asarray(adaptive, jnp.float32)
        real = model.discriminator(images)
        fake = model.discriminator(jax.lax.stop_gradient(recon))
        d_loss, d_parts = objectives_vq.discriminator_hinge_loss(real, fake, step, disc_start=cfg.disc_start)
        total = total + d_loss
        parts |= d_parts
    parts |= model.vq.quantize.usage_metrics(q.indices)
    return total, {k: v for k, v in parts.items() if k != "total"}


def reseed_dead_codes(graphdef, params, frozen, other, batch, rng, step, *, every: int, until: int):
    """Post-update hook of the VQ stage: every `every` steps (until step `until`, 0 = always),
    codes unused in the usage window are replaced by encoder outputs of this batch."""
    from flax import nnx

    from star_jax.models import quantizer

    def reseed(params):
        model = nnx.merge(graphdef, params, frozen, other)
        z = jax.lax.stop_gradient(model.vq.encode_continuous(batch["images"]))
        emb = params["vq"]["quantize"]["embedding"]
        new, _ = quantizer.reseed_dead_codes(
            emb, other["vq"]["quantize"]["codebook_used"], z.reshape(-1, z.shape[-1]), rng, min_count=1
        )
        vq = {**params["vq"], "quantize": {**params["vq"]["quantize"], "embedding": new.astype(emb.dtype)}}
        return {**params, "vq": vq}

    due = (step + 1) % every == 0
    if until:
        due = due & (step < until)
    return jax.lax.cond(due, reseed, lambda p: p, params)
