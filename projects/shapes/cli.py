"""`star-jax pipeline --config projects/shapes/config.py --workdir runs/demo`: every stage, then the report."""

from __future__ import annotations

import sys

from star_jax.cli import common
from star_jax.projects.shapes import pipeline


def main(argv: list[str]) -> int:
    fv = common.parse(argv)
    if fv.config is None or fv.workdir is None:
        print("usage: star-jax pipeline --config projects/shapes/config.py --workdir runs/demo", file=sys.stderr)
        return 2
    report = pipeline.run(fv.config, fv.workdir)
    print(open(f"{fv.workdir}/report.md").read())
    print(f"total wall time {report['total_wall_s']:.0f} s; report in {fv.workdir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(["star-jax pipeline", *sys.argv[1:]]))
