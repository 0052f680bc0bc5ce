"""The Qwen2.5-VL understanding model: vision tower + text decoder (STAR's frozen base, STAR_SPEC 5).

Image embeddings from the tower replace the embeddings of the `<|image_pad|>` tokens, in order
(row-major over the batch, as transformers' `masked_scatter`), then the decoder runs on the mixed
sequence with 3-D M-RoPE positions (`positions.rope_index`). `embed` exposes the mixed
embeddings so generation and STAR's sequence assembly can reuse them with their own caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.models import positions as positions_lib
from star_jax.models import qwen2, vision


def scatter_image_embeds(
    embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array, image_token_id: int
) -> jax.Array:
    """Replaces the embeddings of `image_token_id` tokens by `image_embeds`, in order.

    Args:
      embeds: [B, T, D] text embeddings.
      input_ids: [B, T] int32.
      image_embeds: [M, D], M = number of image tokens in `input_ids` (row-major order).
    Returns:
      [B, T, D] in embeds' dtype. Static shapes: works under jit (the count is checked when the
      ids are concrete).
    """
    is_image = input_ids == image_token_id
    if not isinstance(is_image, jax.core.Tracer):
        count = int(np.asarray(is_image).sum())
        if count != image_embeds.shape[0]:
            raise ValueError(
                f"input_ids hold {count} image tokens (id {image_token_id}) but there are "
                f"{image_embeds.shape[0]} image embeddings"
            )
    index = jnp.cumsum(is_image.reshape(-1)) - 1  # which image embedding each image token takes
    gathered = jnp.take(image_embeds, jnp.clip(index, 0, image_embeds.shape[0] - 1), axis=0)
    gathered = gathered.reshape(*input_ids.shape, -1).astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


class VisionLanguageModel(nnx.Module):
    """Qwen2.5-VL: `tower` (VisionTower) feeding `decoder` (qwen2.Decoder)."""

    def __init__(
        self,
        vision_cfg: vision.VisionConfig,
        decoder_cfg: qwen2.DecoderConfig,
        *,
        image_token_id: int,
        rngs: nnx.Rngs,
    ):
        if vision_cfg.out_hidden_size != decoder_cfg.hidden_size:
            raise ValueError(
                f"vision out_hidden_size={vision_cfg.out_hidden_size} must equal decoder "
                f"hidden_size={decoder_cfg.hidden_size}"
            )
        if not 0 <= image_token_id < decoder_cfg.vocab_size:
            raise ValueError(f"image_token_id={image_token_id} is outside the vocabulary ({decoder_cfg.vocab_size})")
        self.tower = vision.VisionTower(vision_cfg, rngs=rngs)
        self.decoder = qwen2.Decoder(decoder_cfg, rngs=rngs)
        self.image_token_id = image_token_id

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, grid_thw=None) -> jax.Array:
        """input_ids [B, T] int32 (+ pixel_values [N, patch_dim], concrete grid_thw [n, 3]) ->
        embeddings [B, T, D] compute dtype, image tokens replaced by the tower's output."""
        embeds = self.decoder.embed(input_ids)
        if pixel_values is None:
            return embeds
        return scatter_image_embeds(embeds, input_ids, self.tower(pixel_values, grid_thw), self.image_token_id)

    def positions(self, input_ids, grid_thw=None, attention_mask=None) -> jax.Array:
        """M-RoPE positions [3, B, T] int32 of concrete input_ids (see `positions.rope_index`)."""
        return jnp.asarray(
            positions_lib.rope_index(
                np.asarray(input_ids),
                None if grid_thw is None else np.asarray(grid_thw),
                image_token_id=self.image_token_id,
                spatial_merge_size=self.tower.cfg.spatial_merge_size,
                attention_mask=None if attention_mask is None else np.asarray(attention_mask),
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        grid_thw=None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] float32 of a text + image prompt.

        Args:
          input_ids: [B, T] int32 with one run of `<|image_pad|>` per image.
          pixel_values: [N, patch_dim] float (vision_preprocess.preprocess), or None for text only.
          grid_thw: [num_images, 3] int, concrete.
          positions: [3, B, T] int32; default `rope_index` of the (concrete) ids.
          attention_mask: optional [B, T] {0, 1}, 0 = padding.
        """
        if positions is None:
            positions = self.positions(input_ids, grid_thw, attention_mask)
        embeds = self.embed(input_ids, pixel_values, grid_thw)
        hidden, _ = self.decoder.hidden(embeds, positions, attention_mask_2d=attention_mask)
        return self.decoder.logits(hidden)
