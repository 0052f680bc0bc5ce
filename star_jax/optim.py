"""Optimizer, schedules, and the trainable/frozen split from a stage's regexes.

A stage lists the params it trains as regexes over '/'-joined param paths (e.g. `^stacked_ar/`).
`split_trainable` separates the model state into trainable params, frozen params and other
variables; only the trainable tree is differentiated and given optimizer state, so a frozen
param carries no gradient buffer, no Adam moments, and stays bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax
from flax import nnx

from star_jax import sharding, stages


def trainable_filter(patterns: Sequence[str]):
    """An nnx filter selecting `nnx.Param`s whose '/'-joined path matches any pattern."""
    compiled = [re.compile(p) for p in patterns]

    def select(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(map(str, path))
        return any(c.search(name) for c in compiled)

    return select


def split_trainable(model: nnx.Module, patterns: Sequence[str]):
    """(graphdef, trainable params, frozen params, other state) of a model.

    Raises if the patterns match no param, so a typo cannot silently freeze everything.
    """
    graphdef, trainable, frozen, other = nnx.split(model, trainable_filter(patterns), nnx.Param, ...)
    if patterns and not jax.tree.leaves(trainable):
        raise ValueError(f"config.train.trainable={list(patterns)} matches no parameter of the model")
    return graphdef, trainable, frozen, other


def schedule(cfg) -> optax.Schedule:
    """Learning rate: linear warm-up to cfg.lr, then cosine / linear decay to 0, or constant."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    rest = max(cfg.num_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, rest)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"config.train.schedule={cfg.schedule!r} is not one of cosine, linear, constant")
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def scale_by_path(mults: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Per-group learning rates: multiplies each update by the factor of the first regex in `mults`
    that matches its '/'-joined path (1 where none matches), as big_vision's `lr_mults`.

    Placed after the optimizer, so weight decay is scaled with the step. `init` raises if a pattern
    matches no trainable param (a typo would otherwise train at the base rate unnoticed).
    """
    compiled = [(re.compile(pattern), float(factor)) for pattern, factor in mults]

    def factor(path) -> float:
        name = _leaf_name(path)
        return next((f for c, f in compiled if c.search(name)), 1.0)

    def init(params):
        names = [_leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        for c, _ in compiled:
            if not any(c.search(n) for n in names):
                raise ValueError(f"config.train.lr_mults: pattern {c.pattern!r} matches no trainable parameter")
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping, AdamW (betas from config; weight decay skips vectors such as norms and
    biases), then the per-group factors of `cfg.lr_mults` when given."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    chain = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(
            schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    if cfg.get("lr_mults"):
        chain.append(scale_by_path(cfg.lr_mults))
    return optax.chain(*chain)


def footprint(config) -> dict[str, int]:
    """Parameters and optimizer state of `config.stage`, from abstract shapes (nothing allocated):
    {"total_params", "trainable_params", "frozen_params", "param_bytes", "optimizer_bytes"}.

    The stage's model (`stages.build_model`) is traced with `nnx.eval_shape`, split by
    `config.train.trainable` as the trainer splits it, and the optimizer's state is the
    `jax.eval_shape` of `make_optimizer(config.train).init` on the trainable params only.
    """
    # Params are annotated with logical axes, which need a mesh to be built (even abstractly);
    # their shapes do not depend on it.
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.rules_from_config(config)):
        abstract = nnx.eval_shape(lambda: stages.build_model(config, rngs=nnx.Rngs(config.seed)))
    _, trainable, frozen, _ = split_trainable(abstract, list(config.train.trainable))
    trainable, frozen = trainable.to_pure_dict(), frozen.to_pure_dict()
    opt_state = jax.eval_shape(make_optimizer(config.train).init, trainable)
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    nbytes = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return {
        "total_params": count(trainable) + count(frozen),
        "trainable_params": count(trainable),
        "frozen_params": count(frozen),
        "param_bytes": nbytes(trainable) + nbytes(frozen),
        "optimizer_bytes": nbytes(opt_state),
    }
