"""One trainer for every stage (star_jax/stages.py).

Reads top to bottom: validate config -> mesh -> model (born sharded) -> initialise from earlier
stages or resume -> trainable / frozen split -> optimizer (trainable params only) -> input ->
jitted step (in/out shardings, donation, gradient accumulation) -> loop with metrics,
checkpoints and preemption handling. What differs between stages lives in config (trainable
regexes, init_from) and in the stage's registry record (objective, input, FLOPs, sampler), never
in here: `make_task` reads the record into a `Task`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpointing, init_sources, metrics, optim, sharding, stages, train_step
from star_jax.configs import validation
from star_jax.input import pipeline as input_pipeline


class NonFiniteError(RuntimeError):
    """Raised when the loss or the gradient norm is not finite (config.train.nonfinite)."""


@dataclasses.dataclass
class Task:
    """What a stage trains: how to build the model, initialise it, compute the loss, feed it.

    build_model: () -> nnx.Module, built inside the mesh context (params born sharded).
    objective: (model, batch, rng, step) -> (loss f32 scalar, dict of f32 scalar metrics).
    make_iterator: (process_index, process_count) -> checkpointable Grain iterator of numpy dicts.
    initialise: (model, workdir) -> None; fills params from earlier stages / imports (fresh runs).
    batch_axes: key -> logical axis names of that input (batch dimension first).
    flops_per_example / tokens_per_example: for MFU and tokens/s.
    sample: optional (model, step) -> uint8 grid [H, W, 3], drawn every `train.sample_every` steps
      and at the last step (`star_jax.samples`), written as PNG and to TensorBoard.
    post_update: optional (graphdef, params, frozen, other, batch, rng, step) -> params, run inside
      the jitted step after the optimizer update (e.g. re-seeding dead VQ codes).
    """

    build_model: Callable[[], nnx.Module]
    objective: Callable
    make_iterator: Callable[[int, int], Iterator]
    initialise: Callable[[nnx.Module, str], None] | None = None
    batch_axes: dict[str, tuple] | None = None
    flops_per_example: float = 0.0
    tokens_per_example: int = 1
    sample: Callable | None = None
    post_update: Callable | None = None


def make_task(config) -> Task:
    """The `Task` of `config.stage`, read from its registry record (`stages.for_config`)."""
    stage = stages.for_config(config)
    rows = config.train.batch_size // config.train.grad_accum
    layout = stages.vit_layout(config, rows) if stage.uses_vit else None
    return Task(
        build_model=lambda: stages.build_model(config, rngs=nnx.Rngs(config.seed)),
        objective=stage.objective(config, layout),
        make_iterator=lambda pi, pc: input_pipeline.make_iterator(
            config, split="train", process_index=pi, process_count=pc
        ),
        initialise=lambda model, workdir: init_sources.initialise(model, config, workdir),
        flops_per_example=stage.flops_per_example(config),
        tokens_per_example=stage.tokens_per_example(config),
        sample=stage.sampler(config, stage) if stage.sampler is not None else None,
        post_update=stage.post_update(config) if stage.post_update is not None else None,
    )


class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits cleanly at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and exiting at the next step boundary")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _put_batch(batch: dict, mesh, rules, batch_axes: dict | None):
    """Process-local numpy batch -> global jax arrays sharded over the batch axes."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        names = (batch_axes or {}).get(key) or ("batch",) + (None,) * (value.ndim - 1)
        out[key] = jax.make_array_from_process_local_data(sharding.logical_sharding(mesh, rules, names), value)
    return out


def train_and_evaluate(config, workdir: str, task: Task | None = None) -> dict:
    """Trains `config.stage` under `workdir/<stage>/`, resuming from its newest checkpoint.

    `task` defaults to `make_task(config)` (the stage's registry record). Before anything is built,
    `init_sources.prepare` checks the init sources and picks the tokenizer that came with the
    weights. The stage counts once its first checkpoint is complete (config.json is written then):
    a fresh start removes what a failed earlier start left, and a start that fails before its first
    checkpoint removes what it wrote. Returns the last logged metrics. Raises NonFiniteError on a
    non-finite step (stop mode, or after `max_skipped_steps` skips), ConfigError before compiling
    on a bad config, and a one-line ValueError (init_sources.SourceError, CheckpointError) on a bad
    init source or a tokenizer that does not fit the decoder.
    """
    validation.validate(config, num_devices=jax.device_count())
    config, created = init_sources.prepare(config, workdir)
    fresh = not checkpointing.has_checkpoint(workdir, config.stage)
    if fresh and checkpointing.discard_incomplete(workdir, config.stage):
        logging.warning("removed what an earlier failed start of %s left under %s", config.stage, workdir)
    try:
        return _train(config, workdir, make_task(config) if task is None else task)
    except BaseException:
        if fresh and not checkpointing.has_checkpoint(workdir, config.stage):
            for path in created:
                os.remove(path)
            try:
                checkpointing.discard_incomplete(workdir, config.stage)
            except OSError as e:  # a save still in flight; a rerun removes the rest
                logging.warning("could not remove %s/%s after the failed start: %s", workdir, config.stage, e)
        raise


def _train(config, workdir: str, task: Task) -> dict:
    tc = config.train
    mesh = sharding.mesh_from_config(config)
    rules = sharding.rules_from_config(config)
    ckpts = checkpointing.StageCheckpoints(workdir, config.stage, keep_last=tc.keep_last, keep_every=tc.keep_every)
    ckpts.write_config_after_save(config)  # the stage counts once its first checkpoint is complete

    # Model, born sharded; a fresh run initialises from earlier stages / imports.
    model = sharding.create_sharded(task.build_model, mesh, rules)
    latest = ckpts.latest_step()
    with sharding.use_mesh(mesh, rules):
        if latest is None and task.initialise is not None:
            task.initialise(model, workdir)
        graphdef, params, frozen, other = optim.split_trainable(model, list(tc.trainable))
        params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
        del model
        if latest is None:
            ckpts.save_frozen(frozen)
        elif ckpts.has_frozen():
            frozen = ckpts.restore_frozen(frozen)

        tx = optim.make_optimizer(tc)
        opt_state = jax.jit(tx.init, out_shardings=train_step.opt_state_shardings(tx, params, mesh))(params)
        state = {"params": params, "opt_state": opt_state, "other": other, "step": jnp.zeros((), jnp.int32)}
        data_iter = task.make_iterator(jax.process_index(), jax.process_count())
        if latest is not None:
            state = ckpts.restore(latest, state, data_iter)
            logging.info("resumed %s from step %d", config.stage, latest)
        n_trainable = sum(x.size for x in jax.tree.leaves(params))
        n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
        print(f"[{config.stage}] trainable params {n_trainable:,}, frozen {n_frozen:,}", flush=True)

        step_fn = train_step.make_train_step(
            graphdef,
            task.objective,
            tx,
            grad_accum=tc.grad_accum,
            skip_nonfinite=tc.nonfinite == "skip",
            post_update=task.post_update,
            batch_axes=task.batch_axes,
        )
        jitted = train_step.jit_train_step(step_fn, state, frozen)

        writer = metrics.Writer(ckpts.dir, total_steps=tc.num_steps, stage=config.stage)
        step_metrics = metrics.StepMetrics(
            task.flops_per_example * tc.batch_size, task.tokens_per_example * tc.batch_size, metrics.device_peak_flops()
        )
        base_rng = jax.random.key(config.seed)
        step = int(state["step"])
        skipped, last = 0, {}
        sample_every = tc.get("sample_every", 0)
        t_start = time.perf_counter()
        with _Preemption() as preempt:
            while step < tc.num_steps:
                batch = _put_batch(next(data_iter), mesh, rules, task.batch_axes)
                rng = jax.random.fold_in(base_rng, step)
                params, other, opt_state, out = jitted(
                    state["params"], frozen, state["other"], state["opt_state"], batch, rng, jnp.int32(step)
                )
                if not bool(out["finite"]):
                    skipped += 1
                    if tc.nonfinite != "skip" or skipped > tc.max_skipped_steps:
                        ckpts.close()
                        raise NonFiniteError(
                            f"[{config.stage}] non-finite loss {float(out['loss'])} or gradient norm "
                            f"{float(out['grad_norm'])} at step {step} (skipped {skipped - 1} before); the newest "
                            f"checkpoint is step {ckpts.latest_step()} in {ckpts.dir}"
                        )
                step += 1
                state = {"params": params, "opt_state": opt_state, "other": other, "step": jnp.int32(step)}
                step_metrics.update(out)
                if step % tc.log_every == 0 or step == tc.num_steps:
                    last = step_metrics.summary() | {"lr": float(optim.schedule(tc)(step))}
                    if hasattr(data_iter, "stats"):  # skipped / bad records of the input pipeline
                        last |= data_iter.stats()
                    writer.scalars(step, last)
                if task.sample is not None and sample_every and (step % sample_every == 0 or step == tc.num_steps):
                    t_sample = time.perf_counter()
                    grid = task.sample(nnx.merge(graphdef, params, frozen, other), step)
                    print(f"[{config.stage}] samples: {writer.images(step, 'samples', grid)}", flush=True)
                    step_metrics.exclude(time.perf_counter() - t_sample)
                if step % tc.ckpt_every == 0 or step == tc.num_steps or preempt.requested:
                    ckpts.save(step, state, data_iter, force=True)
                if preempt.requested:
                    ckpts.close()
                    writer.close()
                    print(f"[{config.stage}] preempted: saved step {step}, exiting", flush=True)
                    return last
        ckpts.wait()
        ckpts.mark_done(step)
        ckpts.close()
        writer.close()
        last["wall_time_s"] = time.perf_counter() - t_start
        return last
