"""`python -m star_jax.bench data`: build a shapes-world dataset with the tfds builder, then stream it
through the generation-stage input pipeline; prints examples/s of each.

  python -m star_jax.bench data [--num_examples 100000] [--size shapes] [--batch_size 256]
      [--num_workers 0] [--data_dir DIR (default: a temporary directory, removed afterwards)]

Rows: `build` (data/shapes_world.py: render, PNG-encode, serialise, write ArrayRecord),
`stream arrayrecord` (read, parse, decode PNG, resize, tokenise + chat template, batch) and, for
comparison, `stream procedural` (the same examples rendered on the fly, no files).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time

from absl import flags

from star_jax.cli import common
from star_jax.configs import star as star_config
from star_jax.input import pipeline as input_pipeline

DATA_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


def load_shapes_world():
    """data/shapes_world.py (a script dir, not a package) as a module."""
    path = os.path.join(DATA_SCRIPTS, "shapes_world.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the benchmark from a checkout of the repository")
    spec = importlib.util.spec_from_file_location("star_jax_data_shapes_world", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stream(config, num_examples: int) -> tuple[float, dict]:
    """Seconds to draw `num_examples` (whole batches) from the pipeline of `config`, and its stats."""
    it = input_pipeline.make_iterator(config, num_epochs=1)
    next(it)  # start-up (workers, tokenizer) is not throughput
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += len(batch["prompt_ids"])
        if seen >= num_examples:
            break
    elapsed = time.perf_counter() - start
    stats = it.stats()
    it.close()
    return elapsed / max(seen, 1), stats


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_integer("num_examples", 100_000, "examples to build", flag_values=fv)
    flags.DEFINE_string("size", "shapes", "configs/sizes.py name (sets VQ / ViT image sizes)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "pipeline batch size", flag_values=fv)
    flags.DEFINE_integer("num_workers", 0, "Grain worker processes", flag_values=fv)
    flags.DEFINE_integer("stream_examples", 0, "examples to stream (default: all)", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "where to build (default: a temporary directory)", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)

    config = star_config.get_config(f"size={fv.size},stage=generation")
    config.train.batch_size = fv.batch_size
    config.data.num_workers = fv.num_workers
    config.data.num_train_examples = fv.num_examples
    resolution = config.model.vq.image_size
    n_stream = min(fv.stream_examples or fv.num_examples, fv.num_examples)
    data_dir = fv.data_dir or tempfile.mkdtemp(prefix="star_jax_bench_data_")
    print(
        f"shapes world: {fv.num_examples} pairs at {resolution} px, size={fv.size}, batch {fv.batch_size}, "
        f"{fv.num_workers} workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    try:
        shapes_world = load_shapes_world()
        start = time.perf_counter()
        directory = shapes_world.build(
            data_dir, "pairs", num_train=fv.num_examples, num_validation=0, num_heldout=0, resolution=resolution
        )
        build_s = time.perf_counter() - start
        size_mb = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 2**20
        rows = [("build (tfds, array_record)", build_s / fv.num_examples, f"{size_mb:.1f} MiB in {directory}")]
        config.data.source, config.data.path = "arrayrecord", directory
        per_example, stats = stream(config, n_stream)
        rows.append(("stream arrayrecord -> generation batches", per_example, f"{int(stats['data/records_bad'])} bad"))
        config.data.source = "shapes"
        per_example, stats = stream(config, n_stream)
        rows.append(("stream procedural -> generation batches", per_example, f"{int(stats['data/records_bad'])} bad"))
    finally:
        if not fv.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"{'step':42s} {'examples/s':>12s} {'ms/example':>11s}  notes")
    for name, seconds, note in rows:
        print(f"{name:42s} {1 / seconds:12,.0f} {1e3 * seconds:11.3f}  {note}")
    return 0
