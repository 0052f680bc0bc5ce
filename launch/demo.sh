#!/usr/bin/env bash
# The main job on the embedded default: every STAR stage on the shapes world, on this CPU, then
# exact evaluation; writes runs/demo/report.md and runs/demo/samples.png. A rerun skips finished
# stages (DONE markers) and resumes an interrupted one from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh torch,test,aot  # the same extras as launch/test.sh: one venv serves both
# The demo is the CPU job. With the [aot] extra's libtpu in the venv, jax would otherwise probe for a
# TPU first and print libtpu's start-up warnings; JAX_PLATFORMS set by the caller wins.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/star-jax pipeline --config projects/shapes/config.py --workdir runs/demo "$@"
