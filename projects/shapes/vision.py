"""The shapes project's `vision` stage: the ViT pre-trained alone before understanding.

Labels (`config.data.vision_labels`, read by `data.vision_example`):
  caption_words  which vocabulary words the image's caption holds (any image-caption data), a
                 sigmoid classifier (`word_head`) on the mean ViT token
  scene_cells    per merged ViT token, the shape and colour of the object centred in its cell
                 (`cell_head`; the procedural shapes world only), and with `data.scene_centres`
                 that object's centre (x, y) regressed
  scene_cover    as scene_cells, and every token an object paints >= 10 % of names it too

Param paths: `word_head/...` Linear(ViT out -> vocab) or `cell_head/...` Linear(ViT out ->
shapes + colours + 2 + 2), both with bias and zero kernels; trained here, never used after. Name
this module in `config.imports` to register the stage (`config.py` here does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import layers, objectives, stages
from star_jax.models import qwen2
from star_jax.projects.shapes import data
from star_jax.shapes import scene

# Classes of the `cell_head` (without "none"): the shapes world's vocabulary.
CELL_SHAPES, CELL_COLORS = len(scene.SHAPES), len(scene.COLORS)


def _scene_labels(config) -> bool:
    return config.data.get("vision_labels", "caption_words") != "caption_words"


def heads(config, model, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """The stage's head on the ViT, zero-initialised: {"cell_head": ...} with scene labels, else
    {"word_head": ...} (its bias starts every sigmoid near 1 / V: a caption holds few of the V
    words, so the first steps do not just learn the prior, as big_vision does for large label sets)."""
    dt, pdt = qwen2.to_dtype(model.decoder_cfg.dtype), qwen2.to_dtype(model.decoder_cfg.param_dtype)
    width = model.vision_cfg.out_hidden_size
    dense = functools.partial(
        layers.Dense, use_bias=True, dtype=dt, param_dtype=pdt, kernel_init=nnx.initializers.zeros, rngs=rngs
    )
    if _scene_labels(config):
        return {"cell_head": dense(width, CELL_SHAPES + CELL_COLORS + 4, ("embed", None))}  # + 2 none, centre
    vocab = model.decoder_cfg.vocab_size
    bias = nnx.initializers.constant(-float(np.log(vocab)))
    return {"word_head": dense(width, vocab, ("embed", "vocab"), bias_init=bias)}


def caption_word_logits(model, batch: dict, vit_layout=None) -> jax.Array:
    """Logits [B, V] float32 of each vocabulary word being in the image's caption, from the mean of
    the image's ViT output tokens (pixels [B, P, patch_dim])."""
    pooled = jnp.mean(model.vit_embeds(batch["pixels"], vit_layout).astype(jnp.float32), axis=1)
    return model.word_head(pooled).astype(jnp.float32)


def cell_logits(model, batch: dict, vit_layout=None) -> dict[str, jax.Array]:
    """Per merged ViT token (float32): "shape" [B, N, S + 1] and "color" [B, N, C + 1] logits of the
    object labelling its cell (class 0 = none) and "centre" [B, N, 2], that object's predicted
    centre (x, y in cells of the merged grid)."""
    logits = model.cell_head(model.vit_embeds(batch["pixels"], vit_layout)).astype(jnp.float32)
    colors_end = CELL_SHAPES + CELL_COLORS + 2
    return {
        "shape": logits[..., : CELL_SHAPES + 1],
        "color": logits[..., CELL_SHAPES + 1 : colors_end],
        "centre": logits[..., colors_end:],
    }


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multi-label CE (big_vision's `sigmoid_xent`): summed over classes, averaged over rows.
    logits, labels [B, K] (labels in {0, 1}); returns a float32 scalar."""
    logits, labels = logits.astype(jnp.float32), labels.astype(jnp.float32)
    per_class = labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits)
    return jnp.mean(-jnp.sum(per_class, axis=-1))


def caption_words_loss(model, batch, rng, step, *, vit_layout=None):
    """Which vocabulary words the image's caption holds, from the mean ViT token.

    Metrics at threshold 1/2: recall and precision over (row, word) pairs, and the fraction of
    rows whose predicted word set equals the caption's exactly."""
    logits = caption_word_logits(model, batch, vit_layout)
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
    """Per merged ViT token, CE of the shape and of the colour of the object labelling its cell
    (0 = none), summed and averaged over tokens; with `cell_centre` [B, N, 2] in the batch
    (data.scene_centres), + the squared error of that object's centre (in cells), averaged over the
    labelled cells.

    Metrics: shape / colour accuracy over the labelled cells, the fraction of images whose every
    cell (empty or not) is labelled right, and the centre's mean absolute error (cells)."""
    out = cell_logits(model, batch, vit_layout)
    shape_logits, color_logits = out["shape"], out["color"]
    shape_loss, _, _ = objectives.cross_entropy(shape_logits, batch["cell_shape"])
    color_loss, _, _ = objectives.cross_entropy(color_logits, batch["cell_color"])
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
        error = (out["centre"] - batch["cell_centre"]) * occupied[..., None]
        loss = loss + jnp.sum(jnp.square(error)) / n
        metrics["cell_centre_error"] = jnp.sum(jnp.abs(error)) / (2 * n)
    return loss, metrics


def _objective(config, vit_layout):
    data.check_vision_labels(config)
    loss = scene_cells_loss if _scene_labels(config) else caption_words_loss
    return functools.partial(loss, vit_layout=vit_layout)


VISION = stages.register(
    stages.Stage(
        name="vision",
        reads="pairs",
        example=data.vision_example,
        components=("vision",),
        trainable=(r"^vision/", r"^word_head/", r"^cell_head/"),
        objective=_objective,
        uses_vit=True,
        extra_parts=heads,
    )
)
