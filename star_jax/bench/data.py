"""`python -m star_jax.bench data`: build a shapes-world dataset with the tfds builder, then stream it
through the generation-stage input pipeline; prints examples/s of each.

  python -m star_jax.bench data [--num_examples 100000] [--size shapes] [--batch_size 256]
      [--num_workers 0] [--data_dir DIR (default: a temporary directory, removed afterwards)]

Rows: `build` (data/shapes_world.py: render, PNG-encode, serialise, write ArrayRecord),
`stream arrayrecord` (read, parse, decode PNG, resize, tokenise + chat template, batch) and, for
comparison, `stream procedural` (the same examples rendered on the fly, no files).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

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
    from star_jax import input_pipeline

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
    parser = argparse.ArgumentParser(prog="python -m star_jax.bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=100_000)
    parser.add_argument("--size", default="shapes", help="configs/sizes.py name (sets VQ / ViT image sizes)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--stream_examples", type=int, default=0, help="examples to stream (default: all)")
    parser.add_argument("--data_dir", default="", help="where to build (default: a temporary directory)")
    args = parser.parse_args(argv[1:])

    from star_jax.configs import star as star_config

    config = star_config.get_config(f"size={args.size},stage=generation")
    config.train.batch_size = args.batch_size
    config.data.num_workers = args.num_workers
    config.data.num_train_examples = args.num_examples
    resolution = config.model.vq.image_size
    n_stream = min(args.stream_examples or args.num_examples, args.num_examples)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="star_jax_bench_data_")
    print(
        f"shapes world: {args.num_examples} pairs at {resolution} px, size={args.size}, batch {args.batch_size}, "
        f"{args.num_workers} workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    try:
        shapes_world = load_shapes_world()
        start = time.perf_counter()
        directory = shapes_world.build(
            data_dir, "pairs", num_train=args.num_examples, num_validation=0, num_heldout=0, resolution=resolution
        )
        build_s = time.perf_counter() - start
        size_mb = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 2**20
        rows = [("build (tfds, array_record)", build_s / args.num_examples, f"{size_mb:.1f} MiB in {directory}")]
        config.data.source, config.data.path = "arrayrecord", directory
        per_example, stats = stream(config, n_stream)
        rows.append(("stream arrayrecord -> generation batches", per_example, f"{int(stats['data/records_bad'])} bad"))
        config.data.source = "shapes"
        per_example, stats = stream(config, n_stream)
        rows.append(("stream procedural -> generation batches", per_example, f"{int(stats['data/records_bad'])} bad"))
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"{'step':42s} {'examples/s':>12s} {'ms/example':>11s}  notes")
    for name, seconds, note in rows:
        print(f"{name:42s} {1 / seconds:12,.0f} {1e3 * seconds:11.3f}  {note}")
    return 0
