"""Analytic training FLOPs per stage agree with XLA's count of the compiled train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax import flops, optim, sharding, stages, train, train_step
from star_jax.configs import star
from star_jax.input import pipeline
from star_jax.models import qwen2


def _config(size: str, stage: str, **overrides):
    config = star.get_config(f"size={size},stage={stage}")
    config.model.decoder.dtype = "float32"
    config.model.decoder.scan_layers = False  # cost_analysis counts a lax.scan body once
    config.data.vit_image_size = 64 if size == "cpu_ladder" else config.data.vit_image_size
    config.train.batch_size = 4
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def xla_step_flops(config) -> float:
    """FLOPs XLA counts in the trainer's jitted step (`train_step`, `train.make_task`), one device."""
    task = train.make_task(config)
    mesh, rules = sharding.single_device_mesh(), sharding.rules_from_config(config)
    tx = optim.make_optimizer(config.train)
    graphdef, state, frozen = train_step.abstract_state(task.build_model, list(config.train.trainable), tx, mesh, rules)
    step = train_step.make_train_step(
        graphdef, task.objective, tx, grad_accum=1, skip_nonfinite=False, post_update=task.post_update
    )
    batch = next(pipeline.make_iterator(config, split="validation", num_epochs=1))
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    lowered = train_step.jit_train_step(step, state, frozen).lower(
        state["params"], frozen, state["other"], state["opt_state"], batch, jax.random.key(0), jnp.int32(0)
    )
    cost = lowered.compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "size, stage, overrides",
    [
        ("cpu_ladder", "generation", {"data.max_prompt_len": 40, "model.star.stack_layers": 1}),
        ("shapes", "generation", {"data.max_prompt_len": 48}),
    ],
)
def test_analytic_flops_match_xla_within_10_percent(size, stage, overrides):
    config = _config(size, stage, **overrides)
    analytic = stages.for_config(config).flops_per_example(config) * config.train.batch_size
    assert analytic == pytest.approx(xla_step_flops(config), rel=0.10)


def test_frozen_base_costs_backprop_not_training():
    """The frozen base carries the adapter's gradient: 2x forward for its matmuls, not 3x; the
    stack's share grows linearly with its depth."""
    cfg = qwen2.DecoderConfig.from_dict(star.get_config("size=shapes").model.decoder)
    fwd = flops.decoder_pass_flops(cfg, 100, 2, "forward")
    assert flops.decoder_pass_flops(cfg, 100, 2, "train") == pytest.approx(3 * fwd)
    assert 2 * fwd < flops.decoder_pass_flops(cfg, 100, 2, "backprop") < 3 * fwd
    one, two = (
        stages.for_config(c).flops_per_example(c)
        for c in (_config("cpu_ladder", "generation", **{"model.star.stack_layers": n}) for n in (1, 2))
    )
    three = _config("cpu_ladder", "generation", **{"model.star.stack_layers": 3})
    assert stages.for_config(three).flops_per_example(three) - two == pytest.approx(two - one)
    joint = _config("cpu_ladder", "generation", **{"train.trainable": (r"^base/",) + stages.STACK_PARTS})
    assert stages.for_config(joint).flops_per_example(joint) > two  # a trained base costs 3x
    pretok = _config("cpu_ladder", "generation", **{"data.pretokenized": True, "model.star.stack_layers": 2})
    assert stages.for_config(pretok).flops_per_example(pretok) < two  # no VQ encoder in the step
    with pytest.raises(ValueError, match="FLOP mode"):
        flops.decoder_pass_flops(cfg, 1, 1, "inference")
