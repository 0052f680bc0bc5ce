"""STAR: a frozen base (Qwen2.5 decoder + ViT), a stacked AR copied from the base's last N layers,
the pixel adapter and the image head (STAR_SPEC sections 1, 3, 4, 7).

Param paths (what stage configs' trainable regexes and the mapping table name):
  base/...          qwen2.Decoder, frozen after the understanding stage
  vision/...        vision.VisionTower, frozen after the understanding stage
  vq/...            the VQ tokenizer, frozen after the vq stage
  stacked_ar/...    qwen2.LayerStack of N layers + final norm (no embedding of its own)
  pixel_adapter/... MLP with exact GELU: codebook vector [C] -> base width [D]
  image_head/...    Linear(D -> codebook size) with bias
  word_head/...     Linear(ViT out width -> vocab) with bias: the `vision` stage's caption-word
                    classifier on mean-pooled ViT tokens (trained there, never used after it)
  cell_head/...     Linear(ViT out width -> shapes + colours + 2 + 2) with bias: the `vision` stage's
                    per-token scene classifier and centre regressor (data.vision_labels='scene_cells'
                    | 'scene_cover'; shapes world)
  relation_head/... Linear(ViT out width -> relations x shapes x colours) with bias: the `vision`
                    stage's per-token relation bits (data.scene_relations); its own head, so a
                    tower trained on scene labels alone can start a relations run
  count_head/...    Linear(ViT out width -> 3 x (max objects + 1)) with bias: the `vision` stage's
                    per-token object counts (data.scene_counts), likewise its own head

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
from star_jax.models import qwen2
from star_jax.shapes import scene as shapes_scene

# Classes of the `cell_head` (without "none"): the shapes world's vocabulary.
CELL_SHAPES, CELL_COLORS = len(shapes_scene.SHAPES), len(shapes_scene.COLORS)
CELL_RELATIONS = len(shapes_scene.RELATIONS) * CELL_SHAPES * CELL_COLORS  # data.scene_relations bits
# data.scene_counts: (scene objects, same shape, same shape and colour), each a class in 0..max.
CELL_COUNTS, CELL_COUNT_CLASSES = 3, shapes_scene.DEFAULT_WORLD.max_objects + 1
ALL_COMPONENTS = ("base", "vision", "vq", "stacked_ar", "pixel_adapter", "image_head")
STAGE_COMPONENTS = {
    "vq": ("vq", "discriminator"),
    "vision": ("vision", "word_head"),
    "understanding": ("base", "vision"),
    "generation": ALL_COMPONENTS,
    "editing": ALL_COMPONENTS,
}


@dataclasses.dataclass(frozen=True)
class StarConfig:
    """The STAR-specific sizes (the size table's `star` block) and options."""

    stack_layers: int
    adapter_depth: int
    stack_init: str = "copy_last"  # copy_last | random
    caption_dropout: float = 0.1

    @classmethod
    def from_dict(cls, d) -> StarConfig:
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"star config has unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**d)


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
        cell_relations: bool = False,
        cell_counts: bool = False,
        rngs: nnx.Rngs,
    ):
        unknown = set(components) - set(ALL_COMPONENTS) - {"discriminator", "word_head", "cell_head"}
        if unknown:
            raise ValueError(f"unknown STAR components {sorted(unknown)}; known: {ALL_COMPONENTS}")
        self.components = tuple(components)
        self.decoder_cfg, self.star_cfg = decoder_cfg, star_cfg
        dt, pdt = qwen2.to_dtype(decoder_cfg.dtype), qwen2.to_dtype(decoder_cfg.param_dtype)
        if "base" in components:
            self.base = qwen2.Decoder(decoder_cfg, rngs=rngs)
        if "vision" in components:
            from star_jax.models import vision

            self.vision = vision.VisionTower(vision_cfg, rngs=rngs)
            self.vision_cfg = vision_cfg
        if "cell_head" in components:  # the vision stage's per-token scene heads, zero-initialised
            token_head = lambda width, **kw: layers.Dense(  # noqa: E731
                vision_cfg.out_hidden_size,
                width,
                ("embed", None),
                use_bias=True,
                dtype=dt,
                param_dtype=pdt,
                kernel_init=nnx.initializers.zeros,
                rngs=rngs,
                **kw,
            )
            self.cell_head = token_head(CELL_SHAPES + CELL_COLORS + 4)  # + none, none, centre (x, y)
            if cell_relations:
                # Few of the bits are set (about 1 %): start every sigmoid near 1 / K.
                bias = nnx.initializers.constant(-float(np.log(CELL_RELATIONS)))
                self.relation_head = token_head(CELL_RELATIONS, bias_init=bias)
            if cell_counts:
                self.count_head = token_head(CELL_COUNTS * CELL_COUNT_CLASSES)
        if "word_head" in components:  # the vision stage's bag-of-caption-words classifier
            self.word_head = layers.Dense(
                vision_cfg.out_hidden_size,
                decoder_cfg.vocab_size,
                ("embed", "vocab"),
                use_bias=True,
                dtype=dt,
                param_dtype=pdt,
                kernel_init=nnx.initializers.zeros,
                # A caption holds few of the V words: start every sigmoid near 1 / V, as big_vision
                # does for large label sets, so the first steps do not just learn the prior.
                bias_init=nnx.initializers.constant(-float(np.log(decoder_cfg.vocab_size))),
                rngs=rngs,
            )
        if "vq" in components:
            from star_jax.models import vq

            self.vq = vq.VQModel(vq_cfg, rngs=rngs)
            self.vq_cfg = vq_cfg
        if "discriminator" in components:  # the VQ stage's PatchGAN
            from star_jax.models import discriminator

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
    def caption_word_logits(self, batch: dict, vit_layout=None) -> jax.Array:
        """Vision stage: logits [B, V] float32 of each vocabulary word being in the image's caption,
        from the mean of the image's ViT output tokens (pixels [B, P, patch_dim])."""
        pooled = jnp.mean(self.vit_embeds(batch["pixels"], vit_layout).astype(jnp.float32), axis=1)
        return self.word_head(pooled).astype(jnp.float32)

    def cell_logits(self, batch: dict, vit_layout=None) -> dict[str, jax.Array]:
        """Vision stage (scene labels), per merged ViT token (float32): "shape" [B, N, S + 1] and
        "color" [B, N, C + 1] logits of the object labelling its cell (class 0 = none), "centre"
        [B, N, 2] that object's predicted centre (x, y in cells of the merged grid), "relations"
        [B, N, K] logits of its relation bits (K = CELL_RELATIONS with data.scene_relations, else 0)
        and "counts" [B, N, 3, M + 1] logits of its object counts (M = the world's most objects;
        3 = 0 without data.scene_counts)."""
        tokens = self.vit_embeds(batch["pixels"], vit_layout)
        logits = self.cell_head(tokens).astype(jnp.float32)
        colors_end = CELL_SHAPES + CELL_COLORS + 2
        if hasattr(self, "relation_head"):
            relations = self.relation_head(tokens).astype(jnp.float32)
        else:
            relations = jnp.zeros(logits.shape[:-1] + (0,), jnp.float32)
        if hasattr(self, "count_head"):
            counts = self.count_head(tokens).astype(jnp.float32).reshape(*logits.shape[:-1], CELL_COUNTS, -1)
        else:
            counts = jnp.zeros(logits.shape[:-1] + (0, CELL_COUNT_CLASSES), jnp.float32)
        return {
            "shape": logits[..., : CELL_SHAPES + 1],
            "color": logits[..., CELL_SHAPES + 1 : colors_end],
            "centre": logits[..., colors_end:],
            "relations": relations,
            "counts": counts,
        }

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


def build(config, stage: str | None = None, *, rngs: nnx.Rngs) -> Star:
    """The STAR model of `config` with the components `stage` needs."""
    decoder_cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    star_cfg = StarConfig.from_dict(config.model.star)
    components = STAGE_COMPONENTS[stage or config.stage]
    if (stage or config.stage) == "vision" and config.data.get("vision_labels", "caption_words") != "caption_words":
        components = ("vision", "cell_head")
    if "discriminator" in components and not config.get("vq_loss", {}).get("disc_weight", 0.0):
        components = tuple(c for c in components if c != "discriminator")  # no GAN term: no PatchGAN params
    vision_cfg = vq_cfg = None
    if "vision" in components:
        from star_jax.models import vision

        vision_cfg = vision.VisionConfig.from_dict(
            config.model.vision, dtype=decoder_cfg.dtype, param_dtype=decoder_cfg.param_dtype
        )
    if {"vq", "pixel_adapter", "image_head"} & set(components):
        from star_jax.models import vq

        vq_cfg = vq.VQConfig.from_dict(config.model.vq)
    disc_cfg = None
    if "discriminator" in components:
        from star_jax.models import discriminator

        disc_cfg = discriminator.DiscriminatorConfig(**config.vq_loss.discriminator.to_dict())
    return Star(
        decoder_cfg,
        star_cfg,
        vision_cfg=vision_cfg,
        vq_cfg=vq_cfg,
        disc_cfg=disc_cfg,
        components=components,
        cell_relations=bool(config.get("data", {}).get("scene_relations", False)),
        cell_counts=bool(config.get("data", {}).get("scene_counts", False)),
        rngs=rngs,
    )


def count_params(module: nnx.Module) -> int:
    """Number of parameters (from shapes; works on abstract modules)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
