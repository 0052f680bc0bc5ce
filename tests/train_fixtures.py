"""A tiny, learnable text task for trainer tests: the `tiny` decoder learns `x[t+1] = x[t] + k`.

Also runnable as a script, so tests can train in a subprocess and kill it:
  python tests/train_fixtures.py WORKDIR NUM_STEPS [mesh ici, e.g. 2,2,2]
(exits with distributed.PREEMPTED_EXIT_CODE after a SIGTERM save, as `star-jax train` does).
"""

from __future__ import annotations

import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpointing, distributed, train
from star_jax.configs import star
from star_jax.models import qwen2

SEQ = 16


def config(num_steps: int = 12, ici=(-1, 1, 1)):
    c = star.get_config("size=tiny,stage=understanding,runlocal")
    c.train.num_steps = num_steps
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.ckpt_every = 3
    c.train.lr = 3e-3
    c.train.warmup_steps = 2
    c.train.schedule = "constant"  # the LR of a step does not depend on num_steps: runs of any length compare
    c.train.trainable = [r"^stack/layers/(attn|mlp)/", r"^stack/final_norm"]  # embedding frozen
    c.mesh.ici = tuple(ici)
    return c


def make_iterator(batch_size: int, seed: int = 0):
    def example(i):
        rng = np.random.default_rng(i)
        start, k = rng.integers(0, 200), rng.integers(1, 4)
        # "index": which record a row is (the objective ignores it; tests check the data shards).
        return {"ids": ((start + k * np.arange(SEQ + 1)) % 256).astype(np.int32), "index": np.int32(i)}

    def make(process_index: int, process_count: int):
        ds = grain.MapDataset.range(10_000).shuffle(seed=seed).map(example)
        ds = ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True).repeat()
        return iter(ds.to_iter_dataset())

    return make


def lm_objective(model, batch, rng, step):
    ids = batch["ids"]
    logits = model(ids[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    acc = jnp.mean((jnp.argmax(logits, -1) == ids[:, 1:]).astype(jnp.float32))
    return jnp.mean(nll), {"accuracy": acc}


def task(cfg) -> train.Task:
    dcfg = qwen2.DecoderConfig.from_dict(cfg.model.decoder)
    return train.Task(
        build_model=lambda: qwen2.Decoder(dcfg, rngs=nnx.Rngs(cfg.seed)),
        objective=lm_objective,
        make_iterator=make_iterator(cfg.train.batch_size),
        tokens_per_example=SEQ,
    )


if __name__ == "__main__":
    workdir, steps = sys.argv[1], int(sys.argv[2])
    ici = tuple(int(x) for x in sys.argv[3].split(",")) if len(sys.argv) > 3 else (-1, 1, 1)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cfg = config(steps, ici)
    train.train_and_evaluate(cfg, workdir, task(cfg))
    if not checkpointing.is_stage_done(workdir, cfg.stage):  # a preemption save, as `star-jax train`
        sys.exit(distributed.PREEMPTED_EXIT_CODE)
