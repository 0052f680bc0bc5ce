"""The held-out loss of a trained stage: its objective over a fixed evaluation split.

Every run of a sweep ends with this number, computed on the same examples (the first
`num_examples` records of `split`, read in order), so that losses of different runs compare: the
stage's own objective with caption dropout off (deterministic), one jitted forward per batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import init_sources, stages
from star_jax.input import pipeline as input_pipeline


def heldout_loss(
    workdir: str, stage: str, *, split: str = "validation", num_examples: int = 512, batch_size: int = 64
) -> dict:
    """Mean objective of `workdir/<stage>` (newest checkpoint) over the first `num_examples` of `split`.

    Returns {"loss": float (mean over batches of equal size; for image-token stages exactly the
    mean CE per image token), "examples": int, "split": str, "finite": bool} plus the mean of
    every scalar metric the objective reports (e.g. `image_token_accuracy`).
    Raises ValueError naming the argument when num_examples is not a positive multiple of batch_size.
    """
    if batch_size <= 0 or num_examples <= 0 or num_examples % batch_size:
        raise ValueError(f"held-out num_examples={num_examples} must be a positive multiple of batch_size={batch_size}")
    model, config, name = init_sources.load_workdir(workdir, (stage,))
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    config.train.grad_accum = 1
    config.data.num_eval_examples = max(int(config.data.get("num_eval_examples", 0)), num_examples)
    if "star" in config.model:
        config.model.star.caption_dropout = 0.0
    record = stages.for_config(config)
    layout = stages.vit_layout(config, batch_size) if record.uses_vit else None
    objective = record.objective(config, layout)
    graphdef, state = nnx.split(model)

    @jax.jit
    def evaluate(state, batch):
        return objective(nnx.merge(graphdef, state), batch, jax.random.key(0), jnp.int32(0))

    iterator = input_pipeline.make_iterator(config, split=split, num_epochs=1)
    losses, metrics = [], {}
    for _ in range(num_examples // batch_size):
        batch = {k: jnp.asarray(np.asarray(v)) for k, v in next(iterator).items()}
        loss, extra = evaluate(state, batch)
        losses.append(float(loss))
        for key, value in extra.items():
            if np.ndim(value) == 0:
                metrics.setdefault(key, []).append(float(value))
    loss = float(np.mean(losses))
    return {
        "loss": loss,
        "examples": num_examples,
        "split": split,
        "finite": math.isfinite(loss),
        **{k: float(np.mean(v)) for k, v in metrics.items()},
    }
