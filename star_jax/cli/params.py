"""`star-jax params [--sizes 3b,7b] [--stages understanding,generation,editing]`: what each stage
trains and what its optimizer holds, from abstract shapes (no weights are allocated).

Prints one row per (size, stage): total, trainable and frozen parameters, the parameter bytes
and the optimizer-state bytes (AdamW moments of the trainable params only; frozen params have
none). Configs are `configs/star.py:size=<size>,stage=<stage>` with their defaults.
"""

from __future__ import annotations

from absl import flags

from star_jax import optim, stages
from star_jax.cli import common
from star_jax.configs import star


def table(sizes: list[str], stage_names: list[str]) -> list[dict]:
    """One `optim.footprint` dict per (size, stage), with "size" and "stage" added."""
    rows = []
    for size in sizes:
        for stage in stage_names:
            rows.append({"size": size, "stage": stage} | optim.footprint(star.get_config(f"size={size},stage={stage}")))
    return rows


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_list("sizes", ["3b", "7b"], "comma-separated sizes of configs/sizes.py", flag_values=fv)
    flags.DEFINE_list("stages", ["understanding", "generation", "editing"], "comma-separated stages", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    bad = [s for s in fv.stages if s not in stages.names()]
    if bad:
        return common.error(argv[0], f"--stages {bad[0]!r} is not a stage; known: {list(stages.names())}")
    try:
        rows = table(fv.sizes, fv.stages)
    except ValueError as e:
        return common.error(argv[0], e)
    gib = 2.0**30
    print("| size | stage | total params | trainable | frozen | param GiB | optimizer GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['stage']} | {r['total_params']:,} | {r['trainable_params']:,} | "
            f"{r['frozen_params']:,} | {r['param_bytes'] / gib:.2f} | {r['optimizer_bytes'] / gib:.2f} |"
        )
    return 0
