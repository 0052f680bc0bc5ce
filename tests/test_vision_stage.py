"""The vision stage's objective: sigmoid CE against optax's reference, and its metrics."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from star_jax import objectives


def test_sigmoid_cross_entropy_matches_optax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)).astype(np.float32) * 4
    labels = (rng.random((3, 7)) < 0.3).astype(np.float32)
    expected = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()
    np.testing.assert_allclose(
        objectives.sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-6
    )


class _FixedLogits:
    def __init__(self, logits):
        self.logits = jnp.asarray(logits, jnp.float32)

    def caption_word_logits(self, batch, vit_layout=None):
        return self.logits


def test_caption_words_metrics_count_row_word_pairs():
    labels = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], np.float32)
    logits = np.array([[3, 2, -1, -1], [2, 5, -3, -2]], np.float32)  # row 0 exact; row 1: 1 false +, 1 miss
    loss, m = objectives.caption_words_loss(_FixedLogits(logits), {"caption_words": labels}, None, 0)
    assert float(m["word_recall"]) == 3 / 4 and float(m["word_precision"]) == 3 / 4
    assert float(m["word_set_exact"]) == 0.5
    np.testing.assert_allclose(loss, optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean(), rtol=1e-6)


class _FixedCells:
    def __init__(self, shape_logits, color_logits, centre=None, relations=None):
        centre = np.zeros(shape_logits.shape[:2] + (2,)) if centre is None else centre
        relations = np.zeros(shape_logits.shape[:2] + (0,)) if relations is None else relations
        self.logits = tuple(jnp.asarray(x, jnp.float32) for x in (shape_logits, color_logits, centre, relations))

    def cell_logits(self, batch, vit_layout=None):
        counts = jnp.zeros(self.logits[0].shape[:2] + (0, 5), jnp.float32)
        return dict(zip(("shape", "color", "centre", "relations", "counts"), self.logits + (counts,)))


def test_scene_cells_loss_is_two_cross_entropies_and_scores_occupied_cells():
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
    loss, m = objectives.scene_cells_loss(_FixedCells(shape_logits, color_logits), batch, None, 0)
    expected = optax.softmax_cross_entropy_with_integer_labels(shape_logits, cell_shape).mean()
    expected += optax.softmax_cross_entropy_with_integer_labels(color_logits, cell_color).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(m["cell_shape_accuracy"]) == 1.0 and float(m["cell_color_accuracy"]) == pytest.approx(2 / 3)
    assert float(m["scene_exact"]) == 0.5


def test_scene_cells_loss_adds_the_centre_error_of_labelled_cells():
    rng = np.random.default_rng(1)
    shape_logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    color_logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    centre = rng.normal(size=(2, 4, 2)).astype(np.float32)
    cell_shape = np.array([[0, 2, 0, 5], [1, 0, 0, 0]], np.int32)
    cell_color = np.array([[0, 3, 0, 10], [7, 0, 0, 0]], np.int32)
    cell_centre = rng.uniform(0, 4, size=(2, 4, 2)).astype(np.float32) * (cell_shape > 0)[..., None]
    model = _FixedCells(shape_logits, color_logits, centre)
    batch = {"cell_shape": cell_shape, "cell_color": cell_color}
    base, _ = objectives.scene_cells_loss(model, batch, None, 0)
    loss, m = objectives.scene_cells_loss(model, {**batch, "cell_centre": cell_centre}, None, 0)
    labelled = cell_shape > 0  # 3 cells; empty cells' predictions carry no loss
    diff = (centre - cell_centre)[labelled]
    np.testing.assert_allclose(loss - base, np.square(diff).sum() / 3, rtol=1e-5)
    np.testing.assert_allclose(m["cell_centre_error"], np.abs(diff).mean(), rtol=1e-5)


def test_scene_cells_loss_adds_the_relation_bits_of_labelled_cells():
    rng = np.random.default_rng(2)
    shape_logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    color_logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    relation_logits = rng.normal(size=(2, 4, 7)).astype(np.float32) * 3
    cell_shape = np.array([[0, 2, 0, 5], [1, 0, 0, 0]], np.int32)
    cell_color = np.array([[0, 3, 0, 10], [7, 0, 0, 0]], np.int32)
    labelled = cell_shape > 0
    bits = (rng.random((2, 4, 7)) < 0.4).astype(np.float32) * labelled[..., None]
    bits[rng.random((2, 4, 7)) < 0.2] = -1.0  # relations no question asks: no loss, not in the metrics
    model = _FixedCells(shape_logits, color_logits, relations=relation_logits)
    batch = {"cell_shape": cell_shape, "cell_color": cell_color}
    base, _ = objectives.scene_cells_loss(model, batch, None, 0)
    loss, m = objectives.scene_cells_loss(model, {**batch, "cell_relations": bits}, None, 0)
    # Sigmoid CE summed over the supervised bits of the 3 labelled cells, averaged over them.
    known = labelled[..., None] & (bits >= 0)
    assert 0 < (~known & labelled[..., None]).sum()
    expected = optax.sigmoid_binary_cross_entropy(relation_logits, np.maximum(bits, 0))[known].sum() / 3
    np.testing.assert_allclose(loss - base, expected, rtol=1e-5)
    predicted, truth = (relation_logits > 0) & known, bits > 0.5
    np.testing.assert_allclose(m["relation_recall"], (predicted & truth).sum() / truth.sum(), rtol=1e-6)
    np.testing.assert_allclose(m["relation_precision"], (predicted & truth).sum() / predicted.sum(), rtol=1e-6)


def test_count_loss_is_the_scene_count_and_object_counts_cross_entropies():
    rng = np.random.default_rng(1)
    b, n, m = 2, 4, 5
    shape_logits, color_logits = np.zeros((b, n, 6), np.float32), np.zeros((b, n, 11), np.float32)
    counts = rng.normal(size=(b, n, 3, m)).astype(np.float32) * 3
    cell_shape = np.array([[0, 2, 0, 5], [1, 0, 0, 0]], np.int32)
    labels = np.array([[[2, 0, 0], [2, 1, 1], [2, 0, 0], [2, 1, 1]], [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]]])

    class Model:
        def cell_logits(self, batch, vit_layout=None):
            zeros = lambda *s: jnp.zeros((b, n, *s), jnp.float32)  # noqa: E731
            return {
                "shape": jnp.asarray(shape_logits),
                "color": jnp.asarray(color_logits),
                "centre": zeros(2),
                "relations": zeros(0),
                "counts": jnp.asarray(counts),
            }

    batch = {"cell_shape": cell_shape, "cell_color": cell_shape, "cell_counts": labels.astype(np.int32)}
    loss, m_ = objectives.scene_cells_loss(Model(), batch, None, 0)
    base, _ = objectives.scene_cells_loss(Model(), {"cell_shape": cell_shape, "cell_color": cell_shape}, None, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(counts, labels)  # [b, n, 3]
    occupied = cell_shape > 0
    expected = ce[..., 0].mean() + ce[..., 1:][occupied].mean()
    np.testing.assert_allclose(loss - base, expected, rtol=1e-5)
    guess = counts.argmax(-1) == labels
    assert float(m_["scene_count_accuracy"]) == pytest.approx(guess[..., 0].mean())
    assert float(m_["object_count_accuracy"]) == pytest.approx(guess[..., 1:][occupied].mean())


def test_a_scene_label_tower_holds_every_param_of_a_relations_run_but_its_relation_head():
    """A relations run starts from a tower trained on scene labels alone (init_from restores the
    saved params the model has, by path): only relation_head/ is new, every shared param has the
    same shape, and the new head starts every bit near 1 / K."""
    import jax
    from flax import nnx

    from configs import star as star_config
    from star_jax import sharding
    from star_jax.models import star

    def params(relations):
        config = star_config.get_config("size=tiny,stage=vision")
        config.data.vision_labels = "scene_cover"
        config.data.scene_relations = relations
        mesh = sharding.single_device_mesh()
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            _, state = nnx.get_abstract_model(lambda: star.build(config, rngs=nnx.Rngs(0)), mesh)
        return {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(state)}

    plain, relations = params(False), params(True)
    new = set(relations) - set(plain)
    assert new == {"relation_head/kernel", "relation_head/bias"} and not set(plain) - set(relations)
    assert all(plain[k] == relations[k] for k in plain)
    assert relations["relation_head/kernel"][-1] == star.CELL_RELATIONS
    config = star_config.get_config("size=tiny,stage=vision")
    config.data.vision_labels, config.data.scene_relations = "scene_cover", True
    model = sharding.create_sharded(
        lambda: star.build(config, rngs=nnx.Rngs(0)), sharding.single_device_mesh(), sharding.DEFAULT_RULES
    )
    bias = np.asarray(jax.device_get(model.relation_head.bias[...]))
    np.testing.assert_allclose(bias, -np.log(star.CELL_RELATIONS), rtol=1e-6)
