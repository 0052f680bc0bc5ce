"""`star-jax` command line: `star-jax <command> [flags]`.

Each command lives in its own module with a `main(argv)` function; this file only lists them for
`cli.common.dispatch`, which imports the chosen one alone, so that one command never loads the
others' dependencies.
"""

from __future__ import annotations

import sys

from star_jax.cli import common

# command -> (module with `main(argv)`, one-line help)
COMMANDS: common.Subcommands = {
    "train": ("star_jax.cli.train", "train one stage: --config configs/star.py:size=..,stage=.. --workdir W"),
    # The shapes project's staged demo (projects/shapes/cli.py), imported only when asked for.
    "pipeline": ("star_jax.projects.shapes.cli", "every stage on the shapes world, then exact evaluation (the demo)"),
    "generate": ("star_jax.cli.generate", "text-to-image with CFG decoding"),
    "edit": ("star_jax.cli.edit", "edit an image with an instruction"),
    "understand": ("star_jax.cli.understand", "answer a question about an image"),
    "eval": ("star_jax.cli.eval", "evaluate: `eval shapes --images DIR`, `eval qa --workdir W`"),
    "vq": ("star_jax.cli.vq", "VQ tokenizer: `vq encode` / `vq decode` / `vq ceiling`"),
    "export": ("star_jax.cli.export", "export weights to the reference / Hugging Face layout"),
    "import": ("star_jax.cli.import_", "import reference / Hugging Face weights"),
    "params": ("star_jax.cli.params", "trainable / frozen params and optimizer bytes per stage (abstract)"),
    "aot": ("star_jax.cli.aot", "compile a stage's train step for a TPU slice on this machine: fits or not"),
    "sweep": ("star_jax.cli.sweep", "run a scaling sweep (configs/sweeps/*.py), collect, fit and plot"),
    "bench": ("star_jax.bench.__main__", "benchmarks: decoder, data, generate, vision, convert"),
}


def run(argv: list[str] | None = None) -> int:
    """Entry point of the `star-jax` console script; argv[0] is the program name."""
    argv = list(sys.argv if argv is None else argv)
    with common.quiet_console():  # library noise to the log file only (<workdir>/star_jax.log)
        return common.dispatch(["star-jax", *argv[1:]], COMMANDS)


if __name__ == "__main__":
    sys.exit(run())
