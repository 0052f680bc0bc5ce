#!/usr/bin/env bash
# Runs the test suite on CPU (8 simulated devices, set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# aot: the libtpu wheel, so the `star-jax aot` tests compile for TPU slices (they skip without it).
bash launch/setup_venv.sh torch,test,aot
# Two statements, not `a && b`: under `set -e` a failure on the left of && does not stop the script.
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -n 2 --durations=15 tests "$@"
