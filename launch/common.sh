#!/usr/bin/env bash
# Shared helpers of the cluster launchers (tpu_vm.sh, xpk.sh, slurm.sh, slurm.sbatch); sourced, not run.
#   die MESSAGE            one line on stderr, "<script>: MESSAGE", exit 2 (bad arguments)
#   quote_args ARG...      one shell-quoted line that a shell splits back into exactly ARG...
#   run ARG...             runs the command, or with DRY_RUN=1 prints it (quote_args) instead
#   env_assignments FILE   KEY=VALUE for every variable an env file (launch/env/*.env) sets
#   need_value FLAG VALUE  dies when a flag that takes a value got none
#   stage_checkout DIR     copies this checkout's files (tracked, and untracked but not ignored: no
#                          .venv, runs/, caches) into DIR, the code a cluster receives
PROG="${PROG:-$(basename "$0")}"
DRY_RUN="${DRY_RUN:-0}"
# shellcheck disable=SC2034  # read by the scripts that source this file
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Exit status of `star-jax train` after a coordinated save on preemption: "restart me".
# shellcheck disable=SC2034
RESTART_EXIT_CODE=42

die() {
  echo "$PROG: $*" >&2
  exit 2
}

quote_args() {
  local out="" arg
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$arg "
    else
      # Single quotes keep everything literal; a single quote itself becomes '\''.
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_args "$@"
  else
    "$@"
  fi
}

env_assignments() {
  local file="$1"
  [[ -f "$file" ]] || die "--env: no such file: $file"
  # A clean shell so that only what the file sets comes out (not the caller's environment).
  # shellcheck disable=SC2016  # expanded by the inner shell
  env -i PATH="$PATH" bash --noprofile --norc -c '
    set -euo pipefail
    set -a
    # shellcheck disable=SC1090
    source "$1"
    set +a
    for name in $(compgen -e); do
      case "$name" in PATH | PWD | OLDPWD | SHLVL | _) continue ;; esac
      value="${!name}"
      value="${value#"${value%%[![:space:]]*}"}" # the leading blank of VAR+=" --flag" lines
      printf "%s=%s\n" "$name" "$value"
    done' _ "$file" || die "--env: $file failed to load"
}

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

stage_checkout() {
  local dest="$1" root
  root="$(cd "$LAUNCH_DIR/.." && pwd)"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "rm -rf $dest && mkdir -p $dest && git -C $root ls-files -z --cached --others --exclude-standard" \
      "| tar -C $root --null -T - -c | tar -C $dest -x"
    return
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  git -C "$root" ls-files -z --cached --others --exclude-standard | tar -C "$root" --null -T - -c | tar -C "$dest" -x
}
