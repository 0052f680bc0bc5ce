"""The shapes project's vision stage: its objectives against optax's reference, its metrics, its heads."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from star_jax.projects.shapes import vision


def test_sigmoid_cross_entropy_matches_optax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)).astype(np.float32) * 4
    labels = (rng.random((3, 7)) < 0.3).astype(np.float32)
    expected = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()
    np.testing.assert_allclose(
        vision.sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-6
    )


def test_caption_words_metrics_count_row_word_pairs(monkeypatch):
    labels = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], np.float32)
    logits = np.array([[3, 2, -1, -1], [2, 5, -3, -2]], np.float32)  # row 0 exact; row 1: 1 false +, 1 miss
    monkeypatch.setattr(vision, "caption_word_logits", lambda model, batch, layout: jnp.asarray(logits))
    loss, m = vision.caption_words_loss(None, {"caption_words": labels}, None, 0)
    assert float(m["word_recall"]) == 3 / 4 and float(m["word_precision"]) == 3 / 4
    assert float(m["word_set_exact"]) == 0.5
    np.testing.assert_allclose(loss, optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean(), rtol=1e-6)


def _fixed_cells(monkeypatch, shape_logits, color_logits, centre=None):
    centre = np.zeros(shape_logits.shape[:2] + (2,)) if centre is None else centre
    logits = {
        k: jnp.asarray(x, jnp.float32)
        for k, x in zip(("shape", "color", "centre"), (shape_logits, color_logits, centre))
    }
    monkeypatch.setattr(vision, "cell_logits", lambda model, batch, layout: logits)


def test_scene_cells_loss_is_two_cross_entropies_and_scores_occupied_cells(monkeypatch):
    rng = np.random.default_rng(0)
    shape_logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    color_logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    cell_shape = np.array([[0, 2, 0, 5], [1, 0, 0, 0]], np.int32)
    cell_color = np.array([[0, 3, 0, 10], [7, 0, 0, 0]], np.int32)
    # Make exactly: row 0 right everywhere; row 1 right except its object's colour.
    for b in range(2):
        for n in range(4):
            shape_logits[b, n, cell_shape[b, n]] += 20
            color_logits[b, n, cell_color[b, n] if (b, n) != (1, 0) else 2] += 20
    batch = {"cell_shape": cell_shape, "cell_color": cell_color}
    _fixed_cells(monkeypatch, shape_logits, color_logits)
    loss, m = vision.scene_cells_loss(None, batch, None, 0)
    expected = optax.softmax_cross_entropy_with_integer_labels(shape_logits, cell_shape).mean()
    expected += optax.softmax_cross_entropy_with_integer_labels(color_logits, cell_color).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(m["cell_shape_accuracy"]) == 1.0 and float(m["cell_color_accuracy"]) == pytest.approx(2 / 3)
    assert float(m["scene_exact"]) == 0.5


def test_scene_cells_loss_adds_the_centre_error_of_labelled_cells(monkeypatch):
    rng = np.random.default_rng(1)
    shape_logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    color_logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    centre = rng.normal(size=(2, 4, 2)).astype(np.float32)
    cell_shape = np.array([[0, 2, 0, 5], [1, 0, 0, 0]], np.int32)
    cell_color = np.array([[0, 3, 0, 10], [7, 0, 0, 0]], np.int32)
    cell_centre = rng.uniform(0, 4, size=(2, 4, 2)).astype(np.float32) * (cell_shape > 0)[..., None]
    _fixed_cells(monkeypatch, shape_logits, color_logits, centre)
    batch = {"cell_shape": cell_shape, "cell_color": cell_color}
    base, _ = vision.scene_cells_loss(None, batch, None, 0)
    loss, m = vision.scene_cells_loss(None, {**batch, "cell_centre": cell_centre}, None, 0)
    labelled = cell_shape > 0  # 3 cells; empty cells' predictions carry no loss
    diff = (centre - cell_centre)[labelled]
    np.testing.assert_allclose(loss - base, np.square(diff).sum() / 3, rtol=1e-5)
    np.testing.assert_allclose(m["cell_centre_error"], np.abs(diff).mean(), rtol=1e-5)


def test_the_vision_stage_builds_its_head_through_the_registry():
    """The core builds the project's head (extra_parts) with the ViT: a zero kernel, and for the
    word head a bias that starts every sigmoid near 1 / V."""
    import jax
    from flax import nnx

    from star_jax import sharding, stages
    from star_jax.configs import star as star_config

    config = star_config.get_config("size=tiny,stage=vision")
    config.imports = ("star_jax.projects.shapes.vision",)
    model = sharding.create_sharded(
        lambda: stages.build_model(config, rngs=nnx.Rngs(0)), sharding.single_device_mesh(), sharding.DEFAULT_RULES
    )
    bias = np.asarray(jax.device_get(model.word_head.bias[...]))
    np.testing.assert_allclose(bias, -np.log(config.model.decoder.vocab_size), rtol=1e-6)
    assert not np.any(np.asarray(jax.device_get(model.word_head.kernel[...])))
    config.data.vision_labels = "scene_cover"
    model = sharding.create_sharded(
        lambda: stages.build_model(config, rngs=nnx.Rngs(0)), sharding.single_device_mesh(), sharding.DEFAULT_RULES
    )
    assert model.cell_head.kernel[...].shape[-1] == vision.CELL_SHAPES + vision.CELL_COLORS + 4
    assert not hasattr(model, "word_head")
