"""The whole input pipeline of a stage on Grain: `make_iterator(config, split=, process_index=,
process_count=)` -> a checkpointable `bad_records.PipelineIterator` of process-local numpy batches.

All seeded by `config.data.shuffle_seed`, so the same seed gives the same global batches on any
process count (the processes' local batches of a step together hold the rows of the one-process batch):

  indices [0, n) -> shuffle(seed) (train split only) -> this process's share
  [process_index::process_count] -> repeat(num_epochs) -> read + validate + build (`examples.Prepare` with the stage's builder)
  -> the stage's seeded random op (`stages.Stage.augment`) -> drop and count bad records (SkipBad)
  -> batch(batch_size // process_count) -> worker processes (config.data.num_workers)
  -> accounting in the main process (stats, log line, bad-fraction check)

The stage record (`stages.for_config(config)`) decides what is read (`reads`, `sources.make_source`)
and built (`example`); a batch holds the builder's arrays with a leading [B] axis
(B = batch_size // process_count; `examples` lists STAR's).
"""

from __future__ import annotations

import grain
from absl import flags

from star_jax import stages
from star_jax.input import bad_records, examples, sources

READ_THREADS = 2  # threads per process (or worker) that load and assemble examples


def _ensure_flags_parsed(*unused) -> None:
    """Grain's multiprocessing reads absl flags (in the main process and in workers): outside
    `app.run` (tests, notebooks) mark them parsed so their defaults apply."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(config, *, split: str = "train", process_index: int = 0, process_count: int = 1, num_epochs=None):
    """The Grain IterDataset of `config.stage` for one process, before accounting: batches of the
    stage's arrays [B, ...] carrying `_bad` [B, len(records.REASONS)] int32, the skips before each row."""
    stage = stages.for_config(config)
    spec = examples.ExampleSpec.from_config(config, stage)
    batch_size = config.train.batch_size
    if batch_size % process_count:
        raise ValueError(f"config.train.batch_size={batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    source, parser = sources.make_source(config, split, stage)
    seed = config.data.shuffle_seed
    ds = grain.MapDataset.range(len(source))
    if split == "train":  # evaluation splits are read in order
        ds = ds.shuffle(seed=seed)
    # Shuffle, then deal: process p takes every process_count-th index, so the union of the local
    # batches of step k is the same global batch whatever the process count.
    ds = ds[process_index::process_count]
    ds = ds.repeat(num_epochs).map(examples.Prepare(source, parser, spec, stage.example))
    if stage.augment is not None:
        ds = ds.random_map(stage.augment, seed=seed + 1)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=4 * READ_THREADS))
    ds = bad_records.SkipBad(ds, config.data.max_bad_fraction, config.data.bad_check_after)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    if config.data.num_workers > 0:
        _ensure_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        ds = ds.mp_prefetch(options, worker_init_fn=_ensure_flags_parsed)
    return ds


def make_iterator(config, *, split: str = "train", process_index: int = 0, process_count: int = 1, num_epochs=None):
    """Process-local batches of `config.stage` (dicts of numpy arrays [B, ...], B = batch_size //
    process_count) as a checkpointable `bad_records.PipelineIterator`; `num_epochs=None` repeats forever."""
    ds = make_dataset(
        config, split=split, process_index=process_index, process_count=process_count, num_epochs=num_epochs
    )
    return bad_records.PipelineIterator(
        iter(ds),
        max_fraction=config.data.max_bad_fraction,
        check_after=config.data.bad_check_after,
        description=f"[{config.stage}/{split} {process_index}/{process_count}]",
    )
