"""`star-jax train --config configs/star.py:size=..,stage=.. --workdir W`: one stage, resumable."""

from __future__ import annotations

import sys

from star_jax import train
from star_jax.cli import common


def main(argv: list[str]) -> int:
    fv = common.parse(argv)
    if fv.config is None or fv.workdir is None:
        print(
            "usage: star-jax train --config configs/star.py:size=tiny,stage=understanding --workdir DIR",
            file=sys.stderr,
        )
        return 2
    config = fv.config
    out = train.train_and_evaluate(config, fv.workdir)
    print({k: round(v, 5) for k, v in out.items()})
    return 0
