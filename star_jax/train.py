"""One trainer for every stage (star_jax/stages.py).

Reads top to bottom: validate config -> mesh -> model (born sharded) -> initialise from earlier
stages or resume -> trainable / frozen split -> optimizer (trainable params only) -> input ->
jitted step (in/out shardings, donation, gradient accumulation) -> loop with metrics,
checkpoints and coordinated preemption (`distributed.Preemption`). The loop never waits on the host:
batches are put on the devices ahead of the step (`_Feed`), metrics and the finite flag are summed on
the devices and fetched at log / save steps only (`metrics.StepMetrics`, `_Health`). What differs between stages lives in config (trainable
regexes, init_from) and in the stage's registry record (objective, input, FLOPs, sampler), never
in here: `make_task` reads the record into a `Task`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from star_jax import checkpointing, distributed, init_sources, metrics, optim, sharding, stages, train_step
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


class _Feed:
    """The next batches, put on the devices by a thread while the current step runs.

    `next()` returns the global batch (jax arrays sharded over the batch axes) of the next step. The
    Grain position this object reports (`get_state`, what a checkpoint saves through
    `grain.checkpoint.CheckpointSave(feed)`) is the one after the last batch a step *consumed*, not
    after the batches prefetched beyond it, so a resume replays exactly the batches not yet trained.
    `stats()` is the input pipeline's accounting at that same position. An exception of the
    iterator is raised by the `next()` that would have returned its batch.
    """

    def __init__(self, data_iter, put: Callable[[dict], dict], depth: int = 2):
        self._iter = data_iter
        self._put = put
        self._state = _state_text(data_iter.get_state())
        self._stats = data_iter.stats() if hasattr(data_iter, "stats") else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="star_jax-feed", daemon=True)
        self._thread.start()

    def _fill(self):
        while not self._stop.is_set():
            try:
                host = next(self._iter)
                state = _state_text(self._iter.get_state())
                stats = self._iter.stats() if hasattr(self._iter, "stats") else None
                item = (self._put(host), state, stats)
            except BaseException as e:  # handed to the loop, raised where the batch was wanted
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> dict:
        """The next step's batch (waits only when the input is slower than the steps)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state, self._stats = item
        return batch

    def get_state(self) -> bytes:
        """The Grain position after the last consumed batch (JSON, as Grain's own handler writes it)."""
        return self._state.encode()

    def set_state(self, state) -> None:
        raise RuntimeError("restore the data iterator before the feed starts")

    def start_prefetch(self) -> None:
        """Part of the interface Grain's checkpoint handler expects; the feed prefetches by itself."""

    def stats(self) -> dict[str, float]:
        """The input pipeline's counters at the consumed position ({} when it keeps none)."""
        return dict(self._stats or {})

    def close(self) -> None:
        """Stops the thread (after the batch it is reading, if any)."""
        self._stop.set()
        self._thread.join(timeout=60)


def _state_text(state) -> str:
    return state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)


class _Health:
    """Non-finite steps, counted on the devices: `update` only dispatches, `check` fetches.

    A step fails when it is not finite and either `config.train.nonfinite` is "stop" or it is the
    (max_skipped_steps + 1)-th skipped one; `check` raises NonFiniteError naming the first failing
    step, its loss and gradient norm."""

    def __init__(self, stop: bool, max_skipped: int, stage: str):
        self.stop, self.max_skipped, self.stage = stop, max_skipped, stage
        self._h = {
            "skipped": jnp.zeros((), jnp.int32),
            "fail_step": jnp.full((), -1, jnp.int32),
            "fail_loss": jnp.zeros((), jnp.float32),
            "fail_grad_norm": jnp.zeros((), jnp.float32),
        }
        self._update = jax.jit(self._step)

    def _step(self, h, out, step):
        bad = out["finite"] < 0.5
        skipped = h["skipped"] + bad.astype(jnp.int32)
        first = bad & (self.stop | (skipped > self.max_skipped)) & (h["fail_step"] < 0)
        pick = lambda new, old: jnp.where(first, new, old)  # noqa: E731
        return {
            "skipped": skipped,
            "fail_step": pick(step, h["fail_step"]),
            "fail_loss": pick(out["loss"], h["fail_loss"]),
            "fail_grad_norm": pick(out["grad_norm"], h["fail_grad_norm"]),
        }

    def update(self, out: dict, step: jax.Array) -> None:
        """Counts step `step`'s finite flag (device scalars; nothing is fetched)."""
        self._h = self._update(self._h, out, step)

    def check(self, newest_saved: Callable[[], int | None], where: str) -> None:
        """Fetches the counters; raises NonFiniteError when a step failed since the run started."""
        h = jax.device_get(self._h)
        fail = int(h["fail_step"])
        if fail < 0:
            return
        skipped_before = 0 if self.stop else self.max_skipped
        raise NonFiniteError(
            f"[{self.stage}] non-finite loss {float(h['fail_loss'])} or gradient norm {float(h['fail_grad_norm'])} "
            f"at step {fail} (skipped {skipped_before} before); the newest checkpoint is step {newest_saved()} "
            f"in {where}"
        )


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
    `distributed.check_run` checks what the processes must share (batch, workdir) and
    `init_sources.prepare` checks the init sources and picks the tokenizer that came with the
    weights. The stage counts once its first checkpoint is complete (config.json is written then):
    a fresh start removes what a failed earlier start left, and a start that fails before its first
    checkpoint removes what it wrote. Returns the last logged metrics; after a preemption save (SIGTERM
    on any process) it returns without the stage's DONE marker (`star-jax train` then exits with
    `distributed.PREEMPTED_EXIT_CODE`). Raises NonFiniteError on a non-finite step (stop mode, or after
    `max_skipped_steps` skips), ConfigError before compiling on a bad config, and a one-line
    ValueError (init_sources.SourceError, CheckpointError, distributed.DistributedError) on a bad init
    source, a tokenizer that does not fit the decoder, or processes that cannot share the run.
    """
    validation.validate(config, num_devices=jax.device_count())
    distributed.check_run(config, workdir)
    config, created = init_sources.prepare(config, workdir)
    fresh = not checkpointing.has_checkpoint(workdir, config.stage)
    if fresh and checkpointing.discard_incomplete(workdir, config.stage):
        logging.warning("removed what an earlier failed start of %s left under %s", config.stage, workdir)
    distributed.barrier("start checked")  # process 0 installed the tokenizer and cleaned up
    try:
        return _train(config, workdir, make_task(config) if task is None else task)
    except BaseException:
        if fresh and not checkpointing.has_checkpoint(workdir, config.stage) and distributed.is_writer():
            for path in created:
                epath.Path(path).unlink(missing_ok=True)
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
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    as_step = lambda s: jax.device_put(np.int32(s), replicated)  # noqa: E731

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
        state = {"params": params, "opt_state": opt_state, "other": other, "step": as_step(0)}
        data_iter = task.make_iterator(jax.process_index(), jax.process_count())
        if latest is not None:
            state = ckpts.restore(latest, state, data_iter)
            logging.info("resumed %s from step %d", config.stage, latest)
        n_trainable = sum(x.size for x in jax.tree.leaves(params))
        n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
        if distributed.is_writer():
            print(f"[{config.stage}] trainable params {n_trainable:,}, frozen {n_frozen:,}", flush=True)

        step_fn = train_step.task_step(task, graphdef, tx, tc)
        jitted = train_step.jit_train_step(step_fn, state, frozen)

        writer = metrics.Writer(ckpts.dir, total_steps=tc.num_steps, stage=config.stage)
        step_metrics = metrics.StepMetrics(
            task.flops_per_example * tc.batch_size, task.tokens_per_example * tc.batch_size, metrics.device_peak_flops()
        )
        health = _Health(tc.nonfinite != "skip", tc.max_skipped_steps, config.stage)
        base_rng = jax.random.key(config.seed)
        step = int(state["step"])
        last = {}
        sample_every = tc.get("sample_every", 0)
        # Saves by wall time (`config.train.ckpt_every_s` when the config has it; 0 = off): decided at
        # log steps by process 0 and broadcast, so that every process saves the same step.
        ckpt_every_s = tc.get("ckpt_every_s", 0)
        t_start = t_saved = time.perf_counter()
        # Nothing in the loop waits for the devices except log, sample and save steps: the metrics
        # and the finite flag are summed on the devices, the next batch is put there by `feed`.
        feed = _Feed(data_iter, lambda batch: _put_batch(batch, mesh, rules, task.batch_axes))
        try:
            with distributed.Preemption() as preempt:
                while step < tc.num_steps:
                    batch = feed.next()
                    device_step = as_step(step)
                    rng = jax.random.fold_in(base_rng, step)
                    params, other, opt_state, out = jitted(
                        state["params"], frozen, state["other"], state["opt_state"], batch, rng, device_step
                    )
                    health.update(out, device_step)
                    step += 1
                    state = {"params": params, "opt_state": opt_state, "other": other, "step": as_step(step)}
                    step_metrics.update(out)
                    preempted = preempt.reached(step)
                    log_now = step % tc.log_every == 0 or step == tc.num_steps
                    sample_now = (
                        task.sample is not None and sample_every and (step % sample_every == 0 or step == tc.num_steps)
                    )
                    save_now = step % tc.ckpt_every == 0 or step == tc.num_steps or preempted
                    if log_now and ckpt_every_s and not save_now:
                        due = time.perf_counter() - t_saved >= ckpt_every_s
                        save_now = distributed.broadcast_from_0("save" if due else "") == "save"
                    if log_now or sample_now or save_now:  # a failed step is never logged as fine, drawn or saved
                        health.check(ckpts.latest_step, ckpts.dir)
                    if log_now:
                        last = step_metrics.summary() | {"lr": float(optim.schedule(tc)(step))} | feed.stats()
                        writer.scalars(step, last)
                    if sample_now:
                        t_sample = time.perf_counter()
                        grid = task.sample(nnx.merge(graphdef, params, frozen, other), step)
                        path = writer.images(step, "samples", grid)
                        if distributed.is_writer():
                            print(f"[{config.stage}] samples: {path}", flush=True)
                        step_metrics.exclude(time.perf_counter() - t_sample)
                    if save_now:
                        ckpts.save(step, state, feed, force=True)
                        t_saved = time.perf_counter()
                    if preempted:
                        ckpts.close()
                        writer.close()
                        print(f"[{config.stage}] preempted: saved step {step}, exiting{_who()}", flush=True)
                        return last
        except BaseException:
            ckpts.close()
            raise
        finally:
            feed.close()
        ckpts.wait()
        ckpts.mark_done(step)
        ckpts.close()
        writer.close()
        distributed.barrier("stage done")  # every process sees DONE once it returns
        last["wall_time_s"] = time.perf_counter() - t_start
        return last


def _who() -> str:
    return f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
