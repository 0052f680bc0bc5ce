"""`star-jax` command line: `star-jax <command> [flags]`.

Each command lives in its own module with a `main(argv)` function; this file only dispatches, so
that importing one command never imports the others' dependencies.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv)`, one-line help)
COMMANDS = {
    "train": ("star_jax.cli.train", "train one stage: --config configs/star.py:size=..,stage=.. --workdir W"),
    "pipeline": ("star_jax.cli.pipeline", "run the staged shapes-world demo end to end"),
    "generate": ("star_jax.cli.generate", "text-to-image with CFG decoding"),
    "edit": ("star_jax.cli.edit", "edit an image with an instruction"),
    "understand": ("star_jax.cli.understand", "answer a question about an image"),
    "eval": ("star_jax.cli.eval", "evaluate: `eval shapes --images DIR`, `eval qa --workdir W`"),
    "vq": ("star_jax.cli.vq", "VQ tokenizer: `vq encode` / `vq decode`"),
    "export": ("star_jax.cli.export", "export weights to the reference / Hugging Face layout"),
    "import": ("star_jax.cli.import_", "import reference / Hugging Face weights"),
    "params": ("star_jax.cli.params", "trainable / frozen params and optimizer bytes per stage (abstract)"),
    "bench": ("star_jax.bench.__main__", "benchmarks: decoder, data, generate, vision, convert"),
}


def _usage() -> str:
    lines = ["usage: star-jax <command> [flags]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Entry point of the `star-jax` console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"star-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"star-jax: command {command!r} is not available in this build ({e.name})", file=sys.stderr)
            return 2
        raise
    return module.main([f"star-jax {command}"] + argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(run())
