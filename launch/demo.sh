#!/usr/bin/env bash
# The main job on the embedded default: every STAR stage on the shapes world, on this CPU, then
# exact evaluation; writes runs/demo/report.md and runs/demo/samples.png. A rerun skips finished
# stages (DONE markers) and resumes an interrupted one from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh torch,test,aot  # the same extras as launch/test.sh: one venv serves both
exec .venv/bin/star-jax pipeline --config projects/shapes/config.py --workdir runs/demo "$@"
