"""`star-jax params [--sizes 3b,7b] [--stages understanding,generation,editing]`: what each stage
trains and what its optimizer holds, from abstract shapes (no weights are allocated).

Prints one row per (size, stage): total, trainable and frozen parameters, the parameter bytes
and the optimizer-state bytes (AdamW moments of the trainable params only; frozen params have
none). Configs are `configs/star.py:size=<size>,stage=<stage>` with their defaults.
"""

from __future__ import annotations

import argparse
import sys

from star_jax import optim
from star_jax.configs import star


def table(sizes: list[str], stages: list[str]) -> list[dict]:
    """One `optim.footprint` dict per (size, stage), with "size" and "stage" added."""
    rows = []
    for size in sizes:
        for stage in stages:
            rows.append({"size": size, "stage": stage} | optim.footprint(star.get_config(f"size={size},stage={stage}")))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="star-jax params", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="3b,7b", help="comma-separated sizes of configs/sizes.py")
    parser.add_argument("--stages", default="understanding,generation,editing", help="comma-separated stages")
    args = parser.parse_args(argv[1:])
    sizes, stages = args.sizes.split(","), args.stages.split(",")
    bad = [s for s in stages if s not in star.STAGES]
    if bad:
        print(f"star-jax params: --stages {bad[0]!r} is not a stage; known: {list(star.STAGES)}", file=sys.stderr)
        return 2
    try:
        rows = table(sizes, stages)
    except ValueError as e:
        print(f"star-jax params: {e}", file=sys.stderr)
        return 2
    gib = 2.0**30
    print("| size | stage | total params | trainable | frozen | param GiB | optimizer GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['stage']} | {r['total_params']:,} | {r['trainable_params']:,} | "
            f"{r['frozen_params']:,} | {r['param_bytes'] / gib:.2f} | {r['optimizer_bytes'] / gib:.2f} |"
        )
    return 0
