#!/usr/bin/env bash
# Runs one command (normally `star-jax train ...`) on every worker of a Cloud TPU slice obtained as a
# queued resource, from a machine with gcloud:
#
#   launch/tpu_vm.sh --name star3b --zone us-east5-a --type v5p-128 --capacity spot --max-restarts 20 \
#     -- star-jax train --config configs/star.py:size=3b,stage=generation --workdir gs://B/star3b \
#        --config.distributed.mode=auto
#
# 1. create the queued resource (on-demand, spot or reserved) and wait until it is ACTIVE;
# 2. copy this checkout's files (git ls-files: tracked and untracked-not-ignored) as a tarball to
#    every worker, or with --code git clone --repo at --ref there;
# 3. install on every worker: a Python 3.11 venv (uv) with launch/requirements-tpu.txt, star_jax
#    without resolving again;
# 4. on every worker: source the env file (LIBTPU_INIT_ARGS, launch/env/<v5p|v6e>.env by default),
#    copy what the run reads from local paths (--copy-in gs://B/weights=/tmp/weights: `gcloud storage
#    rsync -r`, so a restart copies only what is missing), kill processes still holding the TPU,
#    start the command detached from the ssh session (a dropped connection does not stop training)
#    and wait for it; worker 0's output streams here, every worker keeps ~/star_jax/logs/<name>.log;
# 5. exit 42 (star-jax saved on preemption) or a slice that was taken away (spot): delete and
#    recreate the slice if it is gone, and run again (it resumes from the newest checkpoint), up to
#    --max-restarts times;
# 6. on exit, whatever happened, delete the queued resource (not with --keep).
# --create-arg passes one more flag to `queued-resources create` (e.g. --service-account=SA,
# --network=NET, --valid-until-duration=6h); the workers need read / write access to the buckets
# the command names.
#
# --dry-run prints the commands of one pass (create, wait, copy, install, run, delete) and runs none.
# Bad arguments: one line on stderr, exit 2. `worker-setup`, `worker-run` and `worker-attach` are the
# steps this script runs on the workers (from the copy it put there).
set -euo pipefail
PROG="tpu_vm.sh"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_DIR="star_jax"  # under the ssh user's home on every worker
POLL_S="${STAR_LAUNCH_POLL_S:-30}"
UV_VERSION="0.13.9"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --type TYPE [--project P] [--runtime VERSION]
         [--capacity on-demand|spot|reserved] [--code tarball|git --repo URL --ref REF]
         [--env FILE|none] [--copy-in SRC=DIR]... [--create-arg ARG]... [--max-restarts N] [--keep]
         [--internal-ip] [--dry-run] -- COMMAND...
EOF
}

# ---------------------------------------------------------------- on the workers

worker_setup() {
  # Python 3.11 (jax 0.10.2's minimum) whatever the runtime image ships: uv fetches a managed one.
  local stamp=".venv/.star_jax-tpu-installed" want
  want="$(cat launch/requirements-tpu.txt setup.py | sha1sum | cut -d' ' -f1)"
  if [[ "$DRY_RUN" == 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$PROG: environment up to date"
    return
  fi
  run python3 -m pip install --user --quiet "uv==$UV_VERSION"
  run "$HOME/.local/bin/uv" venv --clear --quiet --python 3.11 .venv
  run "$HOME/.local/bin/uv" pip install --quiet --python .venv/bin/python -r launch/requirements-tpu.txt
  run "$HOME/.local/bin/uv" pip install --quiet --python .venv/bin/python --no-deps -e .
  [[ "$DRY_RUN" == 1 ]] || echo "$want" >"$stamp"
}

worker_number() {
  # The slice's worker index, from the TPU VM metadata server (what jax's TPU cluster detection reads).
  if [[ -n "${STAR_TPU_WORKER_NUMBER:-}" ]]; then
    echo "$STAR_TPU_WORKER_NUMBER"
    return
  fi
  curl -sf --max-time 10 -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
}

kill_tpu_holders() {
  # A process left from an earlier run keeps the chips open and the new one cannot start.
  # /dev/accel* on TPU v4 and earlier, /dev/vfio/* on v5e / v5p / v6e.
  local devices=() pids pid
  shopt -s nullglob
  devices=(/dev/accel* /dev/vfio/*)
  shopt -u nullglob
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "sudo lsof -t /dev/accel* /dev/vfio/* | sort -u | xargs -r sudo kill -9"
    echo "sudo rm -f /tmp/libtpu_lockfile"
    return
  fi
  ((${#devices[@]})) || return 0 # no TPU on this machine
  pids="$(sudo lsof -t "${devices[@]}" 2>/dev/null | sort -u || true)"
  for pid in $pids; do
    echo "$PROG: killing process $pid, which holds the TPU"
    sudo kill -9 "$pid" || true
  done
  sudo rm -f /tmp/libtpu_lockfile
}

worker_attach() {
  # Waits for the detached command; worker 0 streams its log meanwhile. Exit status = the command's.
  local log="$1" status_file="$1.exit" tail_pid=""
  if [[ "$(worker_number || echo 0)" == 0 ]]; then
    tail -n +1 -F "$log" 2>/dev/null &
    tail_pid=$!
  fi
  while [[ ! -f "$status_file" ]]; do sleep 1; done
  sleep 1  # let tail print the last lines
  [[ -z "$tail_pid" ]] || kill "$tail_pid" 2>/dev/null || true
  exit "$(cat "$status_file")"
}

copy_in() {
  # SRC=DIR: the contents of SRC (a gs:// or local directory) into DIR on this worker.
  local src="${1%%=*}" dest="${1#*=}"
  run mkdir -p "$dest"
  run gcloud storage rsync -r "$src" "$dest"
}

worker_run() {
  local env_file="" log="" copies=() pair
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --env) need_value "$@"; env_file="$2"; shift 2 ;;
      --copy-in) need_value "$@"; copies+=("$2"); shift 2 ;;
      --log) need_value "$@"; log="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; break ;;
      *) die "worker-run: unknown argument: $1" ;;
    esac
  done
  [[ -n "$log" ]] || die "worker-run: --log is required"
  [[ $# -gt 0 ]] || die "worker-run: no command after --"
  if [[ -n "$env_file" ]]; then
    [[ -f "$env_file" ]] || die "worker-run: --env: no such file: $env_file"
    set -a
    # shellcheck disable=SC1090
    source "$env_file"
    set +a
  fi
  for pair in ${copies[@]+"${copies[@]}"}; do
    copy_in "$pair"
  done
  kill_tpu_holders
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "PATH=$PWD/.venv/bin:\$PATH setsid $(quote_args "$@") >$log 2>&1; echo \$? >$log.exit"
    return
  fi
  mkdir -p "$(dirname "$log")"
  rm -f "$log.exit"
  export PATH="$PWD/.venv/bin:$PATH"
  # setsid + no terminal: the run survives the ssh session; its status lands in <log>.exit.
  # shellcheck disable=SC2016  # expanded by the inner shell
  setsid bash -c '"${@:2}" >>"$1" 2>&1; echo $? >"$1.exit"' _ "$log" "$@" </dev/null >/dev/null 2>&1 &
  worker_attach "$log"
}

# ---------------------------------------------------------------- on the launching machine

parse_args() {
  NAME="" ZONE="" TYPE="" PROJECT="" RUNTIME="" CAPACITY="on-demand" CODE="tarball" REPO="" REF=""
  ENV_FILE="" ENV_SET=0 MAX_RESTARTS=0 KEEP=0 INTERNAL_IP=0 COPIES=() CREATE_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) need_value "$@"; NAME="$2"; shift 2 ;;
      --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
      --type) need_value "$@"; TYPE="$2"; shift 2 ;;
      --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
      --runtime) need_value "$@"; RUNTIME="$2"; shift 2 ;;
      --capacity) need_value "$@"; CAPACITY="$2"; shift 2 ;;
      --code) need_value "$@"; CODE="$2"; shift 2 ;;
      --repo) need_value "$@"; REPO="$2"; shift 2 ;;
      --ref) need_value "$@"; REF="$2"; shift 2 ;;
      --env) need_value "$@"; ENV_FILE="$2"; ENV_SET=1; shift 2 ;;
      --copy-in)
        need_value "$@"
        [[ "$2" =~ ^[^=]+=/[^=]*$ ]] || die "--copy-in=$2: expected SRC=/absolute/local/dir"
        COPIES+=("$2")
        shift 2
        ;;
      --create-arg) [[ $# -ge 2 && -n "$2" ]] || die "--create-arg needs a value"; CREATE_ARGS+=("$2"); shift 2 ;;
      --max-restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
      --keep) KEEP=1; shift ;;
      --internal-ip) INTERNAL_IP=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) die "unknown argument: $1 (the command to run goes after --)" ;;
    esac
  done
  COMMAND=("$@")
  [[ -n "$NAME" ]] || die "--name is required"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name=$NAME: lowercase letters, digits and hyphens, starting with a letter"
  [[ -n "$ZONE" ]] || die "--zone is required"
  [[ -n "$TYPE" ]] || die "--type is required (e.g. v5p-128, v6e-64)"
  [[ "$TYPE" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] || die "--type=$TYPE: not an accelerator type like v5p-128"
  local generation="${BASH_REMATCH[1]}"
  if [[ -z "$RUNTIME" ]]; then
    case "$generation" in
      v5p) RUNTIME="v2-alpha-tpuv5" ;;
      v6e) RUNTIME="v2-alpha-tpuv6e" ;;
      v5litepod) RUNTIME="v2-alpha-tpuv5-lite" ;;
      v4) RUNTIME="tpu-ubuntu2204-base" ;;
      *) die "--type=$TYPE: no default runtime for $generation, pass --runtime" ;;
    esac
  fi
  case "$CAPACITY" in
    on-demand | spot | reserved) ;;
    *) die "--capacity=$CAPACITY: one of on-demand, spot, reserved" ;;
  esac
  case "$CODE" in
    tarball) [[ -z "$REPO$REF" ]] || die "--repo / --ref go with --code git" ;;
    git) [[ -n "$REPO" && -n "$REF" ]] || die "--code git needs --repo URL and --ref REF" ;;
    *) die "--code=$CODE: one of tarball, git" ;;
  esac
  [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts=$MAX_RESTARTS: not a non-negative integer"
  if [[ "$ENV_SET" == 0 && -f "$LAUNCH_DIR/env/$generation.env" ]]; then
    ENV_FILE="launch/env/$generation.env"
  elif [[ "$ENV_FILE" == none ]]; then
    ENV_FILE=""
  fi
  if [[ -n "$ENV_FILE" ]]; then
    # The workers source it from their copy of the repository: a path inside it, relative to its root.
    [[ "$ENV_FILE" != /* && -f "$ROOT/$ENV_FILE" ]] ||
      die "--env=$ENV_FILE: not a file of this repository (a path relative to its root)"
  fi
  [[ ${#COMMAND[@]} -gt 0 ]] || die "no command: put it after --, e.g. -- star-jax train --config ..."
  if [[ "${COMMAND[0]}" == star-jax && "${COMMAND[1]:-}" == train ]] &&
    [[ " ${COMMAND[*]} " != *" --config.distributed.mode="* ]]; then
    die "the star-jax train command needs --config.distributed.mode=auto on a TPU slice"
  fi
}

gcloud_scope() {
  # --zone / --project, the same on every gcloud call.
  SCOPE=("--zone=$ZONE")
  [[ -z "$PROJECT" ]] || SCOPE+=("--project=$PROJECT")
}

qr_state() {
  gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)' \
    2>/dev/null || echo ABSENT
}

create_and_wait() {
  local create=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME"
    "--accelerator-type=$TYPE" "--runtime-version=$RUNTIME" "${SCOPE[@]}")
  case "$CAPACITY" in
    spot) create+=(--spot) ;;
    reserved) create+=(--reserved) ;;
  esac
  create+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  run "${create[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_args gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)'
    echo "# ... every ${POLL_S} s until the state is ACTIVE"
    return
  fi
  local state
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) echo "$PROG: $NAME is ACTIVE"; return ;;
      FAILED | SUSPENDED | ABSENT) echo "$PROG: $NAME is $state, it will not become ACTIVE" >&2; return 1 ;;
      *) echo "$PROG: $NAME is ${state:-pending}, waiting"; sleep "$POLL_S" ;;
    esac
  done
}

delete_qr() {
  run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
}

ssh_all() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${SCOPE[@]}")
  [[ "$INTERNAL_IP" == 0 ]] || cmd+=(--internal-ip)
  run "${cmd[@]}" "--command=$1"
}

push_code_and_setup() {
  if [[ "$CODE" == git ]]; then
    ssh_all "rm -rf $REMOTE_DIR && git clone --quiet $(quote_args "$REPO") $REMOTE_DIR && git -C $REMOTE_DIR checkout --quiet --detach $(quote_args "$REF") && cd $REMOTE_DIR && bash launch/tpu_vm.sh worker-setup"
    return
  fi
  local tarball="${TMPDIR:-/tmp}/star_jax-$NAME.tar.gz"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "git -C $ROOT ls-files -z --cached --others --exclude-standard | tar -czf $tarball -C $ROOT --null -T -"
  else
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
      tar -czf "$tarball" -C "$ROOT" --null -T -
  fi
  local scp=(gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" --worker=all "${SCOPE[@]}")
  [[ "$INTERNAL_IP" == 0 ]] || scp+=(--internal-ip)
  run "${scp[@]}"
  ssh_all "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && bash launch/tpu_vm.sh worker-setup"
}

run_on_workers() {
  local remote="cd $REMOTE_DIR && bash launch/tpu_vm.sh worker-run"
  [[ -z "$ENV_FILE" ]] || remote+=" --env $ENV_FILE"
  local pair
  for pair in ${COPIES[@]+"${COPIES[@]}"}; do
    remote+=" --copy-in $(quote_args "$pair")"
  done
  remote+=" --log logs/$NAME.log -- $(quote_args "${COMMAND[@]}")"
  ssh_all "$remote"
}

attach_workers() {
  ssh_all "cd $REMOTE_DIR && bash launch/tpu_vm.sh worker-attach logs/$NAME.log"
}

cleanup() {
  local rc=$?
  if [[ "$KEEP" == 1 ]]; then
    echo "$PROG: --keep: $NAME stays; delete it with: $(quote_args gcloud compute tpus queued-resources \
      delete "$NAME" "${SCOPE[@]}" --force --quiet)" >&2
  elif [[ "$DRY_RUN" == 1 || "$(qr_state)" != ABSENT ]]; then
    delete_qr || echo "$PROG: deleting $NAME failed; delete it by hand" >&2
  fi
  exit "$rc"
}

main() {
  ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
  parse_args "$@"
  gcloud_scope
  if [[ "$DRY_RUN" == 0 ]]; then
    local existing
    existing="$(qr_state)"
    # Never take over (and later delete) a queued resource this run did not create.
    [[ "$existing" == ABSENT ]] || die "--name=$NAME: a queued resource of that name exists ($existing)"
  fi
  trap cleanup EXIT
  if [[ "$DRY_RUN" == 1 ]]; then
    create_and_wait
    push_code_and_setup
    run_on_workers
    return 0
  fi
  local restarts=0 fresh=1 rc state reattach=0
  while true; do
    if [[ "$fresh" == 1 ]]; then
      # After a preemption the old (SUSPENDED) resource must go before one of the same name is made.
      [[ "$(qr_state)" == ABSENT ]] || delete_qr
      create_and_wait
      push_code_and_setup
      fresh=0
      rc=0
      run_on_workers || rc=$?
    else
      rc=0
      run_on_workers || rc=$?
    fi
    # ssh itself failed (255) while the slice is up: the run goes on detached, wait for it again.
    while [[ "$rc" == 255 && "$(qr_state)" == ACTIVE && "$reattach" -lt 5 ]]; do
      reattach=$((reattach + 1))
      echo "$PROG: lost the ssh session, attaching again ($reattach/5)" >&2
      rc=0
      attach_workers || rc=$?
    done
    [[ "$rc" != 0 ]] || return 0
    state="$(qr_state)"
    if [[ "$rc" != "$RESTART_EXIT_CODE" && "$state" == ACTIVE ]]; then
      echo "$PROG: the command failed with exit status $rc; see ~/$REMOTE_DIR/logs/$NAME.log on the workers" >&2
      return "$rc"
    fi
    if ((restarts >= MAX_RESTARTS)); then
      echo "$PROG: preempted (exit status $rc, slice $state) and --max-restarts=$MAX_RESTARTS is used up" >&2
      return "$rc"
    fi
    restarts=$((restarts + 1))
    reattach=0
    echo "$PROG: preempted (exit status $rc, slice $state): restart $restarts of $MAX_RESTARTS" >&2
    [[ "$state" == ACTIVE ]] || fresh=1
  done
}

case "${1:-}" in
  worker-setup) shift; [[ "${1:-}" != --dry-run ]] || DRY_RUN=1; worker_setup ;;
  worker-run) shift; worker_run "$@" ;;
  worker-attach) shift; [[ $# == 1 ]] || die "worker-attach LOG"; worker_attach "$1" ;;
  *) main "$@" ;;
esac
