#!/usr/bin/env bash
# Submits launch/slurm.sbatch: one star_jax process per node on a Slurm GPU cluster.
#
#   launch/slurm.sh --nodes 4 --partition gpu --time 24:00:00 \
#     -- star-jax train --config configs/star.py:size=3b,stage=generation --workdir /shared/runs/star3b \
#        --config.distributed.mode=explicit
#
# The repository and its venv (--venv, default <repo>/.venv) must be on a filesystem every node
# mounts; the job runs in the repository (--chdir). Slurm options go to sbatch, the rest to
# launch/slurm.sbatch (which sets the coordinator, the process ids and the env file, and requeues
# the job when star-jax exits 42 after saving on preemption).
# --dry-run prints the sbatch command and runs nothing. Bad arguments: one line on stderr, exit 2.
set -euo pipefail
PROG="slurm.sh"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/slurm.sh --nodes N [--gpus-per-node G] [--partition P] [--account A] [--time T]
         [--job-name NAME] [--output PATTERN] [--env FILE|none] [--venv DIR] [--port N]
         [--max-requeues N] [--dry-run] -- COMMAND...
EOF
}

main() {
  local root nodes="" gpus=8 partition="" account="" time_limit="" job_name="star-jax" output=""
  local env_file="" venv="" port=8476 max_requeues=20
  root="$(cd "$LAUNCH_DIR/.." && pwd)"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --nodes) need_value "$@"; nodes="$2"; shift 2 ;;
      --gpus-per-node) need_value "$@"; gpus="$2"; shift 2 ;;
      --partition) need_value "$@"; partition="$2"; shift 2 ;;
      --account) need_value "$@"; account="$2"; shift 2 ;;
      --time) need_value "$@"; time_limit="$2"; shift 2 ;;
      --job-name) need_value "$@"; job_name="$2"; shift 2 ;;
      --output) need_value "$@"; output="$2"; shift 2 ;;
      --env) need_value "$@"; env_file="$2"; shift 2 ;;
      --venv) need_value "$@"; venv="$2"; shift 2 ;;
      --port) need_value "$@"; port="$2"; shift 2 ;;
      --max-requeues) need_value "$@"; max_requeues="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown argument: $1 (the command to run goes after --)" ;;
    esac
  done
  local command=("$@")
  [[ -n "$nodes" ]] || die "--nodes is required"
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$nodes: not a positive integer"
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node=$gpus: not a positive integer"
  if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then die "--port=$port: not a port number"; fi
  [[ "$max_requeues" =~ ^[0-9]+$ ]] || die "--max-requeues=$max_requeues: not a non-negative integer"
  if [[ -n "$env_file" && "$env_file" != none ]]; then
    [[ -f "$env_file" ]] || die "--env=$env_file: no such file"
    # The job runs in the repository (--chdir): absolute paths mean the same there.
    env_file="$(cd "$(dirname "$env_file")" && pwd)/$(basename "$env_file")"
  fi
  if [[ -n "$venv" ]]; then
    [[ -x "$venv/bin/python" ]] || die "--venv=$venv: no Python environment there"
    venv="$(cd "$venv" && pwd)"
  fi
  [[ ${#command[@]} -gt 0 ]] || die "no command: put it after --, e.g. -- star-jax train --config ..."
  if [[ "${command[0]}" == star-jax && "${command[1]:-}" == train ]] &&
    [[ " ${command[*]} " != *" --config.distributed.mode=explicit "* ]]; then
    die "the star-jax train command needs --config.distributed.mode=explicit (one process per node)"
  fi

  local submit=(sbatch "--job-name=$job_name" "--nodes=$nodes" "--gpus-per-node=$gpus" "--chdir=$root")
  [[ -z "$partition" ]] || submit+=("--partition=$partition")
  [[ -z "$account" ]] || submit+=("--account=$account")
  [[ -z "$time_limit" ]] || submit+=("--time=$time_limit")
  [[ -z "$output" ]] || submit+=("--output=$output")
  submit+=("$root/launch/slurm.sbatch")
  [[ -z "$env_file" ]] || submit+=(--env "$env_file")
  [[ -z "$venv" ]] || submit+=(--venv "$venv")
  submit+=(--port "$port" --max-requeues "$max_requeues" -- "${command[@]}")
  run "${submit[@]}"
}

main "$@"
