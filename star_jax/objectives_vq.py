"""VQ-stage losses and metrics as pure functions (the common trainer wires them; STAR_SPEC section 2).

Generator objective (`vq_generator_loss`): L2 reconstruction (1.0) + perceptual (LPIPS, 1.0, from
user-supplied weights) + quantizer codebook / commitment (beta 0.25) / entropy losses + PatchGAN
hinge generator loss (0.5, from `disc_start` steps on). Discriminator objective
(`discriminator_hinge_loss`) on real vs reconstructed images, also gated by `disc_start`.
Metrics: PSNR, codebook usage over the rolling window, perplexity.

Perceptual loss: `make_perceptual_loss(weights_path)` builds LPIPS (VGG16 features + learned
1x1 channel weights) from a `.safetensors` file with torchvision `features.{i}.{weight,bias}` and
LPIPS `lin{k}.model.1.weight` names. Without a path it returns None when the weight is 0 and
raises `PerceptualWeightsMissing` otherwise, saying exactly what to pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.convert import tensor_io
from star_jax.models import quantizer as qz

# ---------------------------------------------------------------------------------------------
# Reconstruction, adversarial, quantizer


def l2_reconstruction(images: jax.Array, recon: jax.Array) -> jax.Array:
    """mean((recon - images)^2) in float32; images, recon [B, H, W, 3] in [-1, 1]."""
    return jnp.mean(jnp.square(recon.astype(jnp.float32) - images.astype(jnp.float32)))


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))); logits any shape, float32 result."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def hinge_generator_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(D(G(z))) (the generator's hinge loss), float32."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_gan_weight(rec_loss_of, gan_loss_of, last_kernel: jax.Array, max_weight: float = 1e4) -> jax.Array:
    """taming-transformers' adaptive weight: ||d rec / d W|| / (||d gan / d W|| + 1e-4), clipped to
    [0, max_weight] and without gradient, with W the decoder's last layer (`last_kernel`).

    rec_loss_of, gan_loss_of: W -> [] float32 (the losses with W substituted). Scaling the GAN
    term by it keeps the adversarial gradient at the last layer as large as the reconstruction's,
    whatever the losses' magnitudes: with L2 alone (about 0.01) a fixed weight of 0.5 lets the
    discriminator undo reconstruction (27.6 dB -> 15-19 dB in 400 steps on the shapes world).
    """
    g_rec = jax.grad(rec_loss_of)(last_kernel)
    g_gan = jax.grad(gan_loss_of)(last_kernel)
    weight = jnp.linalg.norm(g_rec.astype(jnp.float32)) / (jnp.linalg.norm(g_gan.astype(jnp.float32)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def gate(weight: float, step: jax.Array, start: int) -> jax.Array:
    """`weight` from step `start` on, 0 before (the GAN loss starts after 20k steps in the recipe)."""
    return jnp.where(jnp.asarray(step) >= start, jnp.float32(weight), jnp.float32(0.0))


def quantizer_loss(q: qz.QuantizerOutput) -> jax.Array:
    """codebook + commitment (beta already applied) + entropy (weight already applied): [] float32."""
    return q.codebook_loss + q.commit_loss + q.entropy_loss


# ---------------------------------------------------------------------------------------------
# Metrics


def psnr(images: jax.Array, recon: jax.Array) -> jax.Array:
    """Mean over the batch of per-image PSNR in dB, images / recon [B, H, W, C] in [-1, 1] (peak 1 in [0, 1])."""
    x = (jnp.clip(images.astype(jnp.float32), -1, 1) + 1) / 2
    y = (jnp.clip(recon.astype(jnp.float32), -1, 1) + 1) / 2
    mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def usage_metrics(indices: jax.Array, usage_buffer: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """`codebook_usage` (fraction of codes in the rolling window) and `perplexity` of this batch's codes."""
    return {
        "codebook_usage": qz.codebook_usage(usage_buffer, codebook_size),
        "perplexity": qz.perplexity(indices, codebook_size),
    }


# ---------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-VGG16) from user-supplied weights

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16.features indices
VGG16_TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 follow these convs
VGG16_POOLS = (2, 7, 14, 21)  # max-pool 2x2 after these convs' relus
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class PerceptualWeightsMissing(ValueError):
    """Perceptual loss requested (weight > 0) without a weights file."""


def load_lpips_params(tensors: Mapping[str, np.ndarray]) -> dict[str, jnp.ndarray]:
    """LPIPS-VGG params from reference names; raises naming every missing tensor."""
    names = [f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias")]
    names += [f"lin{k}.model.1.weight" for k in range(len(VGG16_TAPS))]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"LPIPS weights lack {len(missing)} tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    out = {}
    for n in names:
        w = np.asarray(tensors[n], np.float32)
        out[n] = jnp.asarray(np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w)  # OIHW -> HWIO
    return out


def lpips(params: Mapping[str, jax.Array], images: jax.Array, recon: jax.Array) -> jax.Array:
    """LPIPS distance per image [B] float32 of images / recon [B, H, W, 3] in [-1, 1]."""

    def features(x):
        h = (x.astype(jnp.float32) - LPIPS_SHIFT) / LPIPS_SCALE
        taps = []
        for i in VGG16_CONVS:
            h = jax.lax.conv_general_dilated(
                h, params[f"features.{i}.weight"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + params[f"features.{i}.bias"])
            if i in VGG16_TAPS:
                taps.append(h)
            if i in VGG16_POOLS:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return taps

    total = 0.0
    for k, (a, b) in enumerate(zip(features(images), features(recon))):
        a = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)
        b = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + 1e-10)
        lin = params[f"lin{k}.model.1.weight"].reshape(-1)  # (1, C, 1, 1) -> [C]
        total = total + jnp.mean(jnp.sum(jnp.square(a - b) * lin, axis=-1), axis=(1, 2))
    return total


def make_perceptual_loss(weights_path: str | None, weight: float) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """A `loss(images, recon) -> [] float32` (mean LPIPS), or None when `weight` is 0.

    Raises PerceptualWeightsMissing when weight > 0 and no path is given: star_jax ships no VGG /
    LPIPS weights and downloads nothing.
    """
    if not weight:
        if weights_path:
            logging.info("perceptual weights %s ignored: perceptual weight is 0", weights_path)
        return None
    if not weights_path:
        raise PerceptualWeightsMissing(
            f"perceptual loss weight is {weight} but no LPIPS/VGG weights path was given: set the VQ "
            "config's perceptual weights path to a .safetensors with torchvision vgg16 `features.{i}.*` and "
            "LPIPS `lin{k}.model.1.weight` tensors, or set the perceptual weight to 0 (star_jax downloads nothing)"
        )
    params = load_lpips_params(tensor_io.read_tensors(weights_path, allow_pickle=False))
    logging.info("perceptual loss: LPIPS-VGG16 from %s", weights_path)
    return jax.jit(lambda images, recon: jnp.mean(lpips(params, images, recon)))


# ---------------------------------------------------------------------------------------------
# Stage objectives


def vq_generator_loss(
    images: jax.Array,
    recon: jax.Array,
    q: qz.QuantizerOutput,
    logits_fake: jax.Array | None,
    step: jax.Array,
    *,
    l2_weight: float = 1.0,
    perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    perceptual_weight: float = 1.0,
    disc_weight: float = 0.5,
    disc_start: int = 20000,
    adaptive_weight: jax.Array | float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total VQ generator loss [] float32 and its parts (float32 scalars, for logging).

    images / recon: [B, H, W, 3] in [-1, 1]; q: the quantizer output of the same forward;
    logits_fake: the discriminator on `recon` (None when no discriminator); step: [] int;
    adaptive_weight: multiplies the GAN term (`adaptive_gan_weight`, or 1 as in LlamaGen's default).
    """
    rec = l2_reconstruction(images, recon)
    parts = {
        "l2": rec,
        "codebook": q.codebook_loss,
        "commit": q.commit_loss,
        "entropy": q.entropy_loss,
        "psnr": psnr(images, recon),
    }
    total = l2_weight * rec + quantizer_loss(q)
    if perceptual is not None:
        parts["perceptual"] = perceptual(images, recon)
        total = total + perceptual_weight * parts["perceptual"]
    if logits_fake is not None:
        parts["gen_adv"] = hinge_generator_loss(logits_fake)
        total = total + gate(disc_weight, step, disc_start) * adaptive_weight * parts["gen_adv"]
    parts["total"] = total
    return total, parts


def discriminator_hinge_loss(
    logits_real: jax.Array, logits_fake: jax.Array, step: jax.Array, *, disc_start: int = 20000
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Discriminator loss [] float32 (0 before `disc_start`) and logits means for logging.
    `logits_fake` must come from stop-gradient reconstructions."""
    loss = gate(1.0, step, disc_start) * hinge_discriminator_loss(logits_real, logits_fake)
    return loss, {
        "disc": loss,
        "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
        "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
    }


def vq_loss(model, batch, rng, step, *, cfg, perceptual=None):
    """VQ stage: L2 + quantizer losses (+ perceptual) + PatchGAN hinge, in one loss.

    The generator's adversarial term sees the discriminator through stop_gradient, and the
    discriminator's hinge loss sees stop_gradient(reconstructions), so one gradient of the sum
    updates each network by its own objective (a simultaneous GAN step, one optimizer).
    """
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
                rec = cfg.l2 * l2_reconstruction(images, out)
                return rec + (cfg.perceptual * perceptual(images, out) if perceptual is not None else 0.0)

            adaptive = adaptive_gan_weight(
                rec_loss_of,
                lambda w: hinge_generator_loss(frozen_disc(head(w))),
                vq.decoder.conv_out.kernel[...],
            )
    total, parts = vq_generator_loss(
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
        d_loss, d_parts = discriminator_hinge_loss(real, fake, step, disc_start=cfg.disc_start)
        total = total + d_loss
        parts |= d_parts
    parts |= model.vq.quantize.usage_metrics(q.indices)
    return total, {k: v for k, v in parts.items() if k != "total"}


def reseed_dead_codes(graphdef, params, frozen, other, batch, rng, step, *, every: int, until: int):
    """Post-update hook of the VQ stage: every `every` steps (until step `until`, 0 = always),
    codes unused in the usage window are replaced by encoder outputs of this batch."""

    def reseed(params):
        model = nnx.merge(graphdef, params, frozen, other)
        z = jax.lax.stop_gradient(model.vq.encode_continuous(batch["images"]))
        emb = params["vq"]["quantize"]["embedding"]
        new, _ = qz.reseed_dead_codes(
            emb, other["vq"]["quantize"]["codebook_used"], z.reshape(-1, z.shape[-1]), rng, min_count=1
        )
        vq = {**params["vq"], "quantize": {**params["vq"]["quantize"], "embedding": new.astype(emb.dtype)}}
        return {**params, "vq": vq}

    due = (step + 1) % every == 0
    if until:
        due = due & (step < until)
    return jax.lax.cond(due, reseed, lambda p: p, params)
