#!/usr/bin/env bash
# Submits one command (normally `star-jax train ...`) as an XPK workload on a GKE cluster of TPU
# slices that `xpk cluster create` made:
#
#   launch/xpk.sh --cluster my-cluster --workload star3b-gen --tpu-type v5p-128 --num-slices 2 \
#     --base-docker-image us-docker.pkg.dev/P/R/star-jax:0.10.2 --max-restarts 20 \
#     -- star-jax train --config configs/star.py:size=3b,stage=generation --workdir gs://B/star3b \
#        --config.distributed.mode=auto "--config.mesh.dcn=(2,1,1)"
#
# - the image: --docker-image runs an image as it is (launch/Dockerfile: jax, libtpu and star_jax
#   installed, code in /app); --base-docker-image lets xpk copy this checkout into /app on top of
#   it, so code changes need no rebuild; --build builds launch/Dockerfile as that image and pushes
#   it first;
# - the env file (launch/env/<v5p|v6e>.env by default) is read here and passed as --env KEY=VALUE;
# - restarts: the JobSet restarts, up to --max-restarts times, when a worker exits 42 (star-jax saved
#   on preemption; xpk restarts on 42 and 127-255, i.e. also on SIGKILL) and the command resumes from
#   the newest checkpoint; any other failure stops the workload. Kubernetes sends SIGTERM and waits
#   --grace-period seconds before killing a pod, the time the coordinated save has.
#
# --dry-run prints the commands (docker build / push with --build, xpk workload create) and runs none.
# Bad arguments: one line on stderr, exit 2.
set -euo pipefail
PROG="xpk.sh"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/xpk.sh --cluster C --workload W --tpu-type TYPE [--num-slices N] [--project P] [--zone Z]
         (--docker-image IMAGE | --base-docker-image IMAGE) [--build] [--env FILE|none]
         [--max-restarts N] [--grace-period S] [--priority P] [--dry-run] -- COMMAND...
EOF
}

main() {
  local cluster="" workload="" tpu_type="" num_slices=1 project="" zone="" image="" base_image=""
  local build=0 env_file="" env_set=0 max_restarts=10 grace=300 priority=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --cluster) need_value "$@"; cluster="$2"; shift 2 ;;
      --workload) need_value "$@"; workload="$2"; shift 2 ;;
      --tpu-type) need_value "$@"; tpu_type="$2"; shift 2 ;;
      --num-slices) need_value "$@"; num_slices="$2"; shift 2 ;;
      --project) need_value "$@"; project="$2"; shift 2 ;;
      --zone) need_value "$@"; zone="$2"; shift 2 ;;
      --docker-image) need_value "$@"; image="$2"; shift 2 ;;
      --base-docker-image) need_value "$@"; base_image="$2"; shift 2 ;;
      --build) build=1; shift ;;
      --env) need_value "$@"; env_file="$2"; env_set=1; shift 2 ;;
      --max-restarts) need_value "$@"; max_restarts="$2"; shift 2 ;;
      --grace-period) need_value "$@"; grace="$2"; shift 2 ;;
      --priority) need_value "$@"; priority="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown argument: $1 (the command to run goes after --)" ;;
    esac
  done
  local command=("$@")
  [[ -n "$cluster" ]] || die "--cluster is required"
  [[ -n "$workload" ]] || die "--workload is required"
  # xpk's own rule for names (Kubernetes resource names).
  [[ "$workload" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#workload} -le 40 ]] ||
    die "--workload=$workload: at most 40 lowercase letters, digits and hyphens, starting with a letter"
  [[ -n "$tpu_type" ]] || die "--tpu-type is required (e.g. v5p-128, v6e-256)"
  [[ "$tpu_type" =~ ^(v[0-9]+[a-z]*)-[0-9]+$ ]] || die "--tpu-type=$tpu_type: not an accelerator type like v5p-128"
  local generation="${BASH_REMATCH[1]}"
  [[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices=$num_slices: not a positive integer"
  [[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts: not a non-negative integer"
  [[ "$grace" =~ ^[0-9]+$ ]] || die "--grace-period=$grace: not a number of seconds"
  [[ -n "$image" || -n "$base_image" ]] || die "one of --docker-image / --base-docker-image is required"
  [[ -z "$image" || -z "$base_image" ]] || die "--docker-image and --base-docker-image exclude each other"
  if [[ "$env_set" == 0 && -f "$LAUNCH_DIR/env/$generation.env" ]]; then
    env_file="$LAUNCH_DIR/env/$generation.env"
  elif [[ "$env_file" == none ]]; then
    env_file=""
  fi
  [[ -z "$env_file" || -f "$env_file" ]] || die "--env=$env_file: no such file"
  [[ ${#command[@]} -gt 0 ]] || die "no command: put it after --, e.g. -- star-jax train --config ..."
  if [[ "${command[0]}" == star-jax && "${command[1]:-}" == train ]] &&
    [[ " ${command[*]} " != *" --config.distributed.mode="* ]]; then
    die "the star-jax train command needs --config.distributed.mode=auto on GKE"
  fi

  # What the image and the workload get: the checkout's files, not .venv, runs/ or caches.
  local stage="${TMPDIR:-/tmp}/star_jax-xpk-$workload"
  if [[ "$build" == 1 || -n "$base_image" ]]; then
    stage_checkout "$stage"
  fi
  if [[ "$build" == 1 ]]; then
    local tag="${image:-$base_image}"
    run docker build -f "$stage/launch/Dockerfile" -t "$tag" "$stage"
    run docker push "$tag"
  fi

  local create=(xpk workload create "--cluster=$cluster" "--workload=$workload" "--tpu-type=$tpu_type"
    "--num-slices=$num_slices")
  [[ -z "$project" ]] || create+=("--project=$project")
  [[ -z "$zone" ]] || create+=("--zone=$zone")
  if [[ -n "$image" ]]; then
    create+=("--docker-image=$image")
  else
    create+=("--base-docker-image=$base_image" "--script-dir=$stage")
  fi
  [[ -z "$priority" ]] || create+=("--priority=$priority")
  create+=("--max-restarts=$max_restarts" "--restart-on-exit-codes=$RESTART_EXIT_CODE"
    "--termination-grace-period-seconds=$grace")
  if [[ -n "$env_file" ]]; then
    local assignments line
    assignments="$(env_assignments "$env_file")" || exit 2
    while IFS= read -r line; do
      [[ -z "$line" ]] || create+=("--env=$line")
    done <<<"$assignments"
  fi
  # The image's working directory holds the code (/app, launch/Dockerfile and xpk's script dir).
  create+=("--command=cd /app && $(quote_args "${command[@]}")")
  run "${create[@]}"
}

main "$@"
