"""Meshes, rules and sharded execution: a (2, 2, 2) mesh of 8 CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from star_jax import sharding
from star_jax.configs import sizes
from star_jax.models import qwen2


def test_mesh_fill_and_errors():
    assert sharding.resolve_mesh_shape((-1, 2, 2), (1, 1, 1), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape((2, 2, 1), (-1, 1, 1), 8) == (4, 2, 1)
    with pytest.raises(sharding.ShardingError, match="4 devices, but there are 8"):
        sharding.resolve_mesh_shape((2, 2, 1), (1, 1, 1), 8)
    with pytest.raises(sharding.ShardingError, match="at most one -1"):
        sharding.resolve_mesh_shape((-1, -1, 1), (1, 1, 1), 8)
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.resolve_mesh_shape((3, -1, 1), (1, 1, 1), 8)
    with pytest.raises(sharding.ShardingError, match="axis 'fsdp' has size 0"):
        sharding.resolve_mesh_shape((8, 0, 1), (1, 1, 1), 8)
    mesh = sharding.make_mesh((2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_rules_reject_a_mesh_axis_used_twice():
    rules = (("embed", "fsdp"), ("mlp", "fsdp"))
    with pytest.raises(sharding.ShardingError, match="mesh axis 'fsdp' twice"):
        sharding.logical_to_spec(("embed", "mlp"), rules)
    with pytest.raises(sharding.ShardingError, match="no rule"):
        sharding.logical_to_spec(("nope",), rules)
    with pytest.raises(sharding.ShardingError, match="unknown mesh axis"):
        sharding.check_rules((("embed", "model"),))
    spec = sharding.logical_to_spec(("batch", "length", "act_embed"), sharding.DEFAULT_RULES)
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)


def _cfg():
    return qwen2.DecoderConfig.from_dict(sizes.get_size("tiny")["decoder"])


def test_indivisible_param_is_reported_before_init():
    cfg = _cfg()
    mesh = sharding.make_mesh((1, 1, 8))  # 2 kv heads cannot split 8 ways
    with pytest.raises(sharding.ShardingError, match="kv_heads|not divisible"):
        sharding.create_sharded(lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)


def _loss_fn(graphdef, ids):
    def loss(params):
        logits = nnx.merge(graphdef, params)(ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return loss


def _run(mesh):
    """Logits and params after one AdamW step, with params born sharded on `mesh`."""
    cfg = _cfg()
    model = sharding.create_sharded(lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 17)), jnp.int32)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        ids = jax.device_put(ids, sharding.logical_sharding(mesh, sharding.DEFAULT_RULES, ("batch", "length")))
        graphdef, params = nnx.split(model, nnx.Param)
        # Adam's first step is lr * g / (|g| + eps): for the near-zero gradients of unused embedding rows,
        # f32 summation-order noise (which differs between meshes) becomes an O(lr) difference and says
        # nothing about sharding. eps 1e-3 bounds d(update)/dg by lr / eps; gradients are compared too.
        tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(_loss_fn(graphdef, ids))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), loss, grads

        logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ids))(params)
        new_params, loss, grads = step(params, opt_state)
    return model, np.asarray(logits), (new_params, grads), float(loss)


@pytest.mark.slow
def test_sharded_mesh_equals_single_device():
    model8, logits8, params8, loss8 = _run(sharding.make_mesh((2, 2, 2)))
    _, logits1, params1, loss1 = _run(sharding.single_device_mesh())
    np.testing.assert_allclose(logits8, logits1, atol=1e-5)
    assert abs(loss8 - loss1) < 1e-5
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # Params were born sharded: the embedding table is split over fsdp x tensor.
    emb = model8.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (128, 32)
    fraction = sharding.sharded_fraction(model8)
    print(f"sharded fraction of parameter bytes on (2, 2, 2): {fraction:.4f}")
    assert fraction > 0.95
