#!/usr/bin/env bash
# The main job on the embedded default: the shapes world, on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh torch,test
exec .venv/bin/python -m star_jax.bench decoder --sizes shapes "$@"
