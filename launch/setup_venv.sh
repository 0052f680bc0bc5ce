#!/usr/bin/env bash
# Creates .venv in the repository root when missing and installs star_jax with the given extras.
# Usage: source launch/setup_venv.sh [extras]   (default extras: torch,test)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-torch,test}"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
# Reinstall only when setup.py changed (or the extras asked for differ): a warm venv starts at once.
stamp="$root/.venv/.star_jax-installed"
want="$(sha1sum "$root/setup.py" | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$root/.venv/bin/pip" install -q --upgrade pip
  # torch is pinned to 2.13.0 in setup.py: an unpinned torch would pull a multi-GB CUDA build.
  "$root/.venv/bin/pip" install -q -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
