"""The jitted train step, shared by the trainer (`train.py`) and the compile-only check (`aot`).

  make_train_step   the pure step: forward, backward (trainable params only), microbatches,
                    optimizer update, non-finite guard
  abstract_state    params / frozen / other / optimizer state as ShapeDtypeStructs carrying their
                    shardings, built from the stage's model with nothing allocated
  opt_state_shardings  the optimizer state's shardings, derived from the params' (AdamW's moments
                    are sharded exactly like their param; counters are replicated)
  jit_train_step    `jax.jit` with the in / out shardings and donation the trainer runs

The trainer and `star-jax aot` call the same three functions, so what the AOT check compiles for a
TPU slice is the program the trainer runs there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from star_jax import optim, sharding

PyTree = Any


def make_train_step(
    graphdef,
    objective: Callable,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int,
    skip_nonfinite: bool,
    post_update: Callable | None = None,
    batch_axes: dict[str, tuple] | None = None,
):
    """The pure train step: (params, frozen, other, opt_state, batch, rng, step) ->
    (params, other, opt_state, metrics).

    Microbatches run under `lax.scan`; each microbatch is constrained to the batch sharding
    (`batch_axes[key]`, default ("batch", None, ...)) so that after the reshape every data-parallel
    device holds a slice of every microbatch rather than whole microbatches. Gradients are averaged
    in float32. In skip mode a non-finite step leaves params, optimizer state and `other` unchanged.
    `metrics` holds float32 scalars: loss, grad_norm, finite (1.0 / 0.0) and the objective's aux.
    """

    def loss_fn(params, frozen, other, batch, rng, step):
        model = nnx.merge(graphdef, params, frozen, other)
        loss, aux = objective(model, batch, rng, step)
        new_other = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
        return loss.astype(jnp.float32), (aux, new_other)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def split_micro(key, x):
        names = (batch_axes or {}).get(key) or ("batch",) + (None,) * (x.ndim - 1)
        micro = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
        return sharding.constrain(micro, (None, *names))

    def step_fn(params, frozen, other, opt_state, batch, rng, step):
        if grad_accum == 1:
            (loss, (aux, new_other)), grads = grad_fn(params, frozen, other, batch, rng, step)
        else:
            micro = {k: split_micro(k, v) for k, v in batch.items()}

            def body(carry, xs):
                grads_acc, other = carry
                mb, i = xs
                (loss, (aux, other)), g = grad_fn(params, frozen, other, mb, jax.random.fold_in(rng, i), step)
                grads_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
                return (grads_acc, other), (loss, aux)

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, new_other), (losses, auxes) = jax.lax.scan(body, (zeros, other), (micro, jnp.arange(grad_accum)))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = jnp.mean(losses)
            aux = jax.tree.map(jnp.mean, auxes)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if post_update is not None:
            new_params = post_update(
                graphdef, new_params, frozen, new_other, batch, jax.random.fold_in(rng, 0x7FFFFFFF), step
            )
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_params = keep(new_params, params)
            new_opt_state = keep(new_opt_state, opt_state)
            new_other = keep(new_other, other)
        out = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32), **aux}
        return new_params, new_other, new_opt_state, out

    return step_fn


def task_step(task, graphdef, tx: optax.GradientTransformation, train_config):
    """`make_train_step` for a `train.Task` (its objective, post_update and batch axes) with
    `config.train`'s gradient accumulation and non-finite mode: the step the trainer, the AOT check
    and the benchmark all run."""
    return make_train_step(
        graphdef,
        task.objective,
        tx,
        grad_accum=train_config.grad_accum,
        skip_nonfinite=train_config.nonfinite == "skip",
        post_update=task.post_update,
        batch_axes=task.batch_axes,
    )


def opt_state_shardings(tx: optax.GradientTransformation, params: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Shardings of `tx.init(params)`: a leaf shaped like a param (AdamW's mu / nu) takes that
    param's sharding, every other leaf (step counters, empty states) is replicated on `mesh`.

    `params` holds arrays or ShapeDtypeStructs with `.sharding` set.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


def abstract_state(build_model: Callable[[], nnx.Module], trainable: list[str], tx, mesh, rules):
    """(graphdef, state, frozen) of a fresh run, as ShapeDtypeStructs with their shardings.

    state = {"params", "opt_state", "other", "step"}, as the trainer checkpoints it; frozen holds
    the params the stage does not train. Nothing is allocated: a 7B model on a CPU machine is fine.
    """
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(build_model, mesh)
        sharding.check_state_sharding(abstract, rules, mesh)
        model = nnx.merge(graphdef, abstract)
        graphdef, params, frozen, other = optim.split_trainable(model, trainable)
        params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
    opt_shardings = opt_state_shardings(tx, params, mesh)
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), jax.eval_shape(tx.init, params), opt_shardings
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return graphdef, {"params": params, "opt_state": opt_state, "other": other, "step": step}, frozen


def jit_train_step(step_fn: Callable, state: PyTree, frozen: PyTree):
    """`step_fn` jitted with the trainer's shardings: params, other and optimizer state keep the
    shardings of `state`'s leaves (arrays or ShapeDtypeStructs) and are donated; frozen params
    keep theirs; the batch follows its arrays' own shardings; metrics are replicated."""
    shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    params, other, opt_state = shard(state["params"]), shard(state["other"]), shard(state["opt_state"])
    return jax.jit(
        step_fn,
        in_shardings=(params, shard(frozen), other, opt_state, None, None, None),
        out_shardings=(params, other, opt_state, None),
        donate_argnums=(0, 2, 3),
    )
