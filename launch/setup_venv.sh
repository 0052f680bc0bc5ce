#!/usr/bin/env bash
# Creates .venv in the repository root when missing and installs star_jax with the given extras.
# Usage: source launch/setup_venv.sh [extras]   (default extras: torch,test,aot)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-torch,test,aot}"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
# Reinstall only when setup.py changed (or the extras asked for differ): a warm venv starts at once.
stamp="$root/.venv/.star_jax-installed"
want="$(sha1sum "$root/setup.py" | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$root/.venv/bin/pip" install -q --upgrade pip
  # torch is pinned to 2.13.0 in setup.py: an unpinned torch would pull a multi-GB CUDA build.
  if ! "$root/.venv/bin/pip" install -q -e "$root[$extras]"; then
    # The aot extra is the libtpu wheel (Linux x86_64 / aarch64 only): without it the rest still
    # installs, and the AOT tests skip, saying why.
    case ",$extras," in *,aot,*) ;; *) exit 1 ;; esac
    rest="$(echo ",$extras," | sed 's/,aot,/,/; s/^,//; s/,$//')"
    echo "setup_venv: the libtpu wheel (extra 'aot') could not be installed; star-jax aot and its tests are skipped" >&2
    "$root/.venv/bin/pip" install -q -e "$root[$rest]"
  fi
  echo "$want" > "$stamp"
fi
