"""`star-jax understand --workdir W --image I --question "..." [--max_new_tokens 32]`: the base answers."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from star_jax.cli.edit import read_image


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--question", required=True)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args(argv[1:])
    from star_jax.decode import runner

    try:
        images = None if args.image is None else np.stack([read_image(args.image)])
        star = runner.StarRunner.from_workdir(args.workdir, stages=("editing", "generation", "understanding"))
        answer = star.understand(
            images, [args.question], max_new_tokens=args.max_new_tokens, temperature=args.temperature
        )
    except ValueError as e:
        print(f"star-jax understand: {e}", file=sys.stderr)
        return 2
    print(answer[0])
    return 0
