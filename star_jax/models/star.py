"""STAR: a frozen base (Qwen2.5 decoder + ViT), a stacked AR copied from the base's last N layers,
the pixel adapter and the image head (STAR_SPEC sections 1, 3, 4, 7).

Param paths (what stage configs' trainable regexes and the mapping table name):
  base/...          qwen2.Decoder, frozen after the understanding stage
  vision/...        vision.VisionTower, frozen after the understanding stage
  vq/...            the VQ tokenizer, frozen after the vq stage
  stacked_ar/...    qwen2.LayerStack of N layers + final norm (no embedding of its own)
  pixel_adapter/... MLP with exact GELU: codebook vector [C] -> base width [D]
  image_head/...    Linear(D -> codebook size) with bias
  <project>/...     parts a project's stage adds (`extra_parts`), e.g. a classifier on the ViT

A stage builds only the components it needs (`components`), so a VQ run never holds an LLM.
Data flow for image tokens: embeddings (text from the base table, image tokens as
adapter(codebook[code]), ViT output at ViT slots) -> base -> final-normed hidden -> stacked AR
-> final norm -> image head. Gradients flow through the frozen base into the adapter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import layers
from star_jax.config_dataclass import dataclass_from_dict
from star_jax.models import discriminator, qwen2, vision, vq

ALL_COMPONENTS = ("base", "vision", "vq", "stacked_ar", "pixel_adapter", "image_head")
KNOWN_COMPONENTS = ALL_COMPONENTS + ("discriminator",)


@dataclasses.dataclass(frozen=True)
class StarConfig:
    """The STAR-specific sizes (the size table's `star` block) and options."""

    stack_layers: int
    adapter_depth: int
    stack_init: str = "copy_last"  # copy_last | random
    caption_dropout: float = 0.1

    @classmethod
    def from_dict(cls, d) -> StarConfig:
        """From the config's `model.star` block; unknown keys raise naming them."""
        return dataclass_from_dict(cls, d, "star")


class PixelAdapter(nnx.Module):
    """Linear(C -> D), then [GELU (erf), Linear(D -> D)] x (depth - 1): the reference `MLP_GELU`."""

    def __init__(self, in_dim: int, width: int, depth: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dims = [in_dim] + [width] * depth
        self.linears = nnx.List(
            [
                layers.Dense(
                    dims[i],
                    dims[i + 1],
                    (None, "embed"),
                    use_bias=True,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] -> [..., D]."""
        for i, linear in enumerate(self.linears):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = linear(x)
        return x


def fill_slots(embeds: jax.Array, slot_mask: jax.Array, values: jax.Array) -> jax.Array:
    """Writes values [B, M, D] into the True slots of slot_mask [B, T], in order per row.

    Rows must have exactly M slots (true by construction of the batch layouts).
    """
    index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, values.shape[1] - 1)  # [B, T]
    gathered = jnp.take_along_axis(values, index[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(slot_mask[..., None], gathered, embeds)


class Star(nnx.Module):
    """STAR with the components of one stage; see the module docstring for the layout."""

    def __init__(
        self,
        decoder_cfg: qwen2.DecoderConfig,
        star_cfg: StarConfig,
        *,
        vision_cfg=None,
        vq_cfg=None,
        disc_cfg=None,
        components: tuple[str, ...] = ALL_COMPONENTS,
        extra_parts=None,
        rngs: nnx.Rngs,
    ):
        unknown = set(components) - set(KNOWN_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown STAR components {sorted(unknown)}; known: {KNOWN_COMPONENTS}")
        self.components = tuple(components)
        self.decoder_cfg, self.star_cfg = decoder_cfg, star_cfg
        dt, pdt = qwen2.to_dtype(decoder_cfg.dtype), qwen2.to_dtype(decoder_cfg.param_dtype)
        if "base" in components:
            self.base = qwen2.Decoder(decoder_cfg, rngs=rngs)
        if "vision" in components:
            self.vision = vision.VisionTower(vision_cfg, rngs=rngs)
            self.vision_cfg = vision_cfg
        if extra_parts is not None:  # a project's parts (e.g. ViT classifier heads); built here, as before
            for name, part in extra_parts(self, rngs).items():
                setattr(self, name, part)
        if "vq" in components:
            self.vq = vq.VQModel(vq_cfg, rngs=rngs)
            self.vq_cfg = vq_cfg
        if "discriminator" in components:  # the VQ stage's PatchGAN
            self.discriminator = discriminator.PatchGANDiscriminator(disc_cfg, rngs=rngs)
        if "stacked_ar" in components:
            self.stacked_ar = qwen2.LayerStack(decoder_cfg, star_cfg.stack_layers, rngs=rngs)
        if "pixel_adapter" in components:
            self.pixel_adapter = PixelAdapter(
                vq_cfg.codebook_dim,
                decoder_cfg.hidden_size,
                star_cfg.adapter_depth,
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )
        if "image_head" in components:
            self.image_head = layers.Dense(
                decoder_cfg.hidden_size,
                vq_cfg.codebook_size,
                ("embed", "codebook"),
                use_bias=True,
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )

    # -- initialisation ------------------------------------------------------------------------
    def copy_stack_from_base(self) -> None:
        """Initialises the stacked AR as copies of the base's last N layers and its final norm."""
        n, total = self.star_cfg.stack_layers, self.decoder_cfg.num_layers
        if n > total:
            raise ValueError(f"stack_layers={n} > base num_layers={total}")
        # Copies, not views: a stack param sharing a buffer with a frozen base param would be
        # donated by the train step while the base still reads it.
        base_layers = nnx.state(self.base.stack.layers, nnx.Param)
        nnx.update(self.stacked_ar.layers, jax.tree.map(lambda x: jnp.copy(x[total - n :]), base_layers))
        final_norm = nnx.state(self.base.stack.final_norm, nnx.Param)
        nnx.update(self.stacked_ar.final_norm, jax.tree.map(jnp.copy, final_norm))

    # -- embeddings ----------------------------------------------------------------------------
    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """Image tokens [B, N] int32 -> adapter(codebook[codes]) [B, N, D]; the codebook is the VQ's."""
        vectors = jnp.take(self.vq.quantize.codebook(), codes, axis=0)
        return self.pixel_adapter(vectors)

    def vit_embeds(self, pixels: jax.Array, layout) -> jax.Array:
        """pixels [B, P, patch_dim] (one image per row, same grid) -> [B, P / merge^2, D]."""
        b, p, d = pixels.shape
        out = self.vision.encode(pixels.reshape(b * p, d), layout)
        return out.reshape(b, -1, out.shape[-1])

    def embed_prompt(self, batch: dict, vit_layout=None) -> jax.Array:
        """Prompt embeddings [B, Tp, D]: text from the base table; ViT output at `vit_mask` slots;
        adapter(codebook[source codes]) at `src_mask` slots (editing)."""
        x = self.base.embed(batch["prompt_ids"])
        if "vit_mask" in batch:
            x = fill_slots(x, batch["vit_mask"], self.vit_embeds(batch["pixels"], vit_layout))
        if "src_mask" in batch:
            x = fill_slots(x, batch["src_mask"], self.embed_codes(batch["src_codes"]))
        return x

    # -- heads ---------------------------------------------------------------------------------
    def text_logits(self, batch: dict, vit_layout=None) -> jax.Array:
        """Understanding: base logits [B, Tp, V] float32 over the prompt (positions [B, 3, Tp])."""
        x = self.embed_prompt(batch, vit_layout)
        h, _ = self.base.hidden(x, _streams(batch["positions"]), attention_mask_2d=batch["prompt_mask"])
        return self.base.logits(h)

    def image_logits(self, batch: dict, codes: jax.Array, vit_layout=None) -> jax.Array:
        """Generation / editing (teacher forcing): logits [B, N, K] float32 for the N image tokens.

        The input is the prompt (ending in <|vision_start|>) followed by the first N - 1 image
        tokens; the prompt's last position predicts token 0, token j predicts token j + 1.
        positions: [B, 3, Tp + N] (the last one unused).
        """
        prompt = self.embed_prompt(batch, vit_layout)
        b, tp = batch["prompt_ids"].shape
        n = codes.shape[1]
        x = jnp.concatenate([prompt, self.embed_codes(codes[:, :-1]).astype(prompt.dtype)], axis=1)
        mask = jnp.concatenate([batch["prompt_mask"], jnp.ones((b, n - 1), bool)], axis=1)
        positions = _streams(batch["positions"])[:, :, : tp + n - 1]
        h, _ = self.base.hidden(x, positions, attention_mask_2d=mask)
        h, _ = self.stacked_ar(h, positions, attention_mask_2d=mask)
        return self.image_head(h[:, tp - 1 :]).astype(jnp.float32)


def _streams(positions: jax.Array) -> jax.Array:
    """Batch-first positions [B, 3, T] -> the decoder's [3, B, T]."""
    return jnp.transpose(positions, (1, 0, 2))


def build(config, components: tuple[str, ...], *, rngs: nnx.Rngs, extra_parts=None) -> Star:
    """The STAR model of `config` with `components` (a stage's parts, `stages.Stage.components`).

    extra_parts: optional (model, rngs) -> {name: nnx.Module}, a project's parts, built after the
    ViT. The PatchGAN is left out when `config.vq_loss.disc_weight` is 0 (no GAN term, no params).
    """
    decoder_cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    star_cfg = StarConfig.from_dict(config.model.star)
    if "discriminator" in components and not config.get("vq_loss", {}).get("disc_weight", 0.0):
        components = tuple(c for c in components if c != "discriminator")
    vision_cfg = vq_cfg = disc_cfg = None
    if "vision" in components:
        vision_cfg = vision.VisionConfig.from_dict(
            config.model.vision, dtype=decoder_cfg.dtype, param_dtype=decoder_cfg.param_dtype
        )
    if {"vq", "pixel_adapter", "image_head"} & set(components):
        vq_cfg = vq.VQConfig.from_dict(config.model.vq)
    if "discriminator" in components:
        disc_cfg = discriminator.DiscriminatorConfig(**config.vq_loss.discriminator.to_dict())
    return Star(
        decoder_cfg,
        star_cfg,
        vision_cfg=vision_cfg,
        vq_cfg=vq_cfg,
        disc_cfg=disc_cfg,
        components=components,
        extra_parts=extra_parts,
        rngs=rngs,
    )


def count_params(module: nnx.Module) -> int:
    """Number of parameters (from shapes; works on abstract modules)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
