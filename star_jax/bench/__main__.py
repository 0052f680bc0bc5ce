"""`python -m star_jax.bench <name> [flags]` (or `star-jax bench <name>`): benchmarks that print
measured numbers (never run as tests). `<name> --help` lists a benchmark's flags."""

from __future__ import annotations

import sys

from star_jax.cli import common

# name -> (module with `main(argv)`, imported only when chosen; one-line help)
BENCHES: common.Subcommands = {
    "decoder": (
        "star_jax.bench.decoder",
        "prefill / decode tokens/s and forward FLOP/s against a measured matmul peak",
    ),
    "data": ("star_jax.bench.data", "build a shapes-world dataset, stream it through the generation pipeline"),
    "generate": ("star_jax.bench.generate", "text-to-image images/s: compiled CFG loop vs the PyTorch reference"),
    "train": (
        "star_jax.bench.train",
        "generation-stage training step tokens/s: the trainer's jitted step vs PyTorch + transformers",
    ),
    "vision": ("star_jax.bench.vision", "vision tower forward + backward images/s, per-frame vs masked block"),
    "convert": ("star_jax.bench.convert", "export / import time and peak host memory for a STAR size"),
}


def main(argv: list[str]) -> int:
    """argv[0] is the program name ("star-jax bench" from the console script)."""
    return common.dispatch(argv, BENCHES, __doc__)


if __name__ == "__main__":
    sys.exit(main(["python -m star_jax.bench", *sys.argv[1:]]))
