"""The vision stage's objective: sigmoid CE against optax's reference, and its metrics."""

import jax.numpy as jnp
import numpy as np
import optax

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
