"""launch/: the cluster launchers (TPU VM queued resources, XPK, Slurm) and their env files.

`--dry-run` output is pinned command by command (split with shlex, so quoting is checked too); the
restart logic runs for real against stand-ins for `gcloud`, `srun` and `scontrol` put first on
PATH; bad arguments give one line on stderr and exit 2; the H100 XLA flags are parsed by the
installed jaxlib (which rejects unknown flags).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN = [
    "star-jax",
    "train",
    "--config",
    "configs/star.py:size=3b,stage=generation",
    "--workdir",
    "gs://bucket/star3b",
    "--config.distributed.mode=auto",
    "--config.mesh.ici=(-1,1,1)",
]
V5P_FLAGS = [
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_all_reduce=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_scoped_vmem_limit_kib=98304",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STAR_"))}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        cwd=cwd,
        timeout=60,
    )


def _commands(stdout: str) -> list[list[str]]:
    """Dry-run output as argument lists (comment lines dropped)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _option(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return value


# ---------------------------------------------------------------- TPU VM / queued resources


def test_tpu_vm_dry_run_pins_every_command(tmp_path):
    out = _run(
        "tpu_vm.sh",
        *("--name", "star3b", "--zone", "us-east5-a", "--type", "v5p-128", "--capacity", "spot"),
        *("--project", "my-proj", "--copy-in", "gs://b/weights=/tmp/weights", "--dry-run", "--", *TRAIN),
        env=_env(TMPDIR=str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    scope = ["--zone=us-east5-a", "--project=my-proj"]
    tarball = f"{tmp_path}/star_jax-star3b.tar.gz"
    lines = [line for line in out.stdout.splitlines() if line]
    assert lines[2] == "# ... every 30 s until the state is ACTIVE"
    assert lines[3] == (
        f"git -C {ROOT} ls-files -z --cached --others --exclude-standard | tar -czf {tarball} -C {ROOT} --null -T -"
    )
    cmds = _commands("\n".join(lines[:3] + lines[4:]))
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "star3b", "--worker=all", *scope]
    assert cmds[0] == [
        *("gcloud", "compute", "tpus", "queued-resources", "create", "star3b", "--node-id=star3b"),
        *("--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", *scope, "--spot"),
    ]
    assert cmds[1] == [
        *("gcloud", "compute", "tpus", "queued-resources", "describe", "star3b", *scope),
        "--format=value(state.state)",
    ]
    assert cmds[2] == [
        *("gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "star3b:star_jax.tar.gz", "--worker=all", *scope)
    ]
    assert cmds[3] == [
        *ssh,
        "--command=rm -rf star_jax && mkdir star_jax && tar -xzf star_jax.tar.gz -C star_jax"
        " && cd star_jax && bash launch/tpu_vm.sh worker-setup",
    ]
    assert cmds[4][:-1] == ssh
    remote = shlex.split(cmds[4][-1].removeprefix("--command="))
    assert remote == [
        *("cd", "star_jax", "&&", "bash", "launch/tpu_vm.sh", "worker-run"),
        *("--env", "launch/env/v5p.env", "--copy-in", "gs://b/weights=/tmp/weights"),
        *("--log", "logs/star3b.log", "--", *TRAIN),
    ]
    assert cmds[5] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "star3b",
        *scope,
        "--force",
        "--quiet",
    ]
    assert len(cmds) == 6


def test_tpu_vm_dry_run_reserved_git_and_v6e_defaults():
    out = _run(
        "tpu_vm.sh",
        *("--name", "gen", "--zone", "europe-west4-a", "--type", "v6e-64", "--capacity", "reserved"),
        *("--code", "git", "--repo", "https://example.org/lab/star_jax.git", "--ref", "v1.2"),
        *("--internal-ip", "--create-arg", "--service-account=sa@p.iam.gserviceaccount.com", "--dry-run", "--", *TRAIN),
    )
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert cmds[0][-4:] == [
        *("--runtime-version=v2-alpha-tpuv6e", "--zone=europe-west4-a", "--reserved"),
        "--service-account=sa@p.iam.gserviceaccount.com",
    ]
    assert "--spot" not in cmds[0]
    assert cmds[2][-2:] == [
        "--internal-ip",
        "--command=rm -rf star_jax && git clone --quiet https://example.org/lab/star_jax.git star_jax"
        " && git -C star_jax checkout --quiet --detach v1.2 && cd star_jax && bash launch/tpu_vm.sh worker-setup",
    ]
    remote = shlex.split(cmds[3][-1].removeprefix("--command="))
    assert remote[remote.index("--env") + 1] == "launch/env/v6e.env"
    # No tarball in git mode; on-demand is the default capacity (neither --spot nor --reserved).
    assert not any("tar -czf" in line for line in out.stdout.splitlines())
    on_demand = _run(
        "tpu_vm.sh", "--name", "a", "--zone", "z", "--type", "v5p-8", "--env", "none", "--dry-run", "--", "echo"
    )
    first = _commands(on_demand.stdout)[0]
    assert "--spot" not in first and "--reserved" not in first
    assert "--env" not in shlex.split(_commands(on_demand.stdout)[-2][-1].removeprefix("--command="))


_FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for gcloud: records each call, keeps the queued resource's state in a file, and answers
# the run / attach ssh calls with the next code of $FAKE/codes ("preempt" = the slice is taken away).
printf '%s\n' "$*" >> "$FAKE/calls"
case "$*" in
  *"queued-resources describe"*) s="$(cat "$FAKE/state")"; [ "$s" = ABSENT ] && exit 1; echo "$s" ;;
  *"queued-resources create"*) echo ACTIVE > "$FAKE/state" ;;
  *"queued-resources delete"*) echo ABSENT > "$FAKE/state" ;;
  *"tpu-vm ssh"*worker-run*|*"tpu-vm ssh"*worker-attach*)
    code="$(head -n 1 "$FAKE/codes")"; sed -i 1d "$FAKE/codes"
    if [ "$code" = preempt ]; then echo SUSPENDED > "$FAKE/state"; exit 255; fi
    exit "$code" ;;
esac
exit 0
"""


def _fake_tools(tmp_path: Path, **scripts: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE=str(tmp_path), STAR_LAUNCH_POLL_S="0")


def _gcloud_ops(tmp_path: Path) -> list[str]:
    """The recorded gcloud calls as short names, describes left out."""
    ops = []
    for call in (tmp_path / "calls").read_text().splitlines():
        for key, op in [
            ("queued-resources create", "create"),
            ("queued-resources delete", "delete"),
            ("tpu-vm scp", "scp"),
            ("worker-setup", "setup"),
            ("worker-run", "run"),
            ("worker-attach", "attach"),
        ]:
            if key in call:
                ops.append(op)
    return ops


@pytest.mark.parametrize(
    "codes, max_restarts, rc, ops",
    [
        # Spot preemption: the slice goes (SUSPENDED), is deleted, made again, and the run resumes.
        (
            ["preempt", "0"],
            2,
            0,
            ["create", "scp", "setup", "run", "delete", "create", "scp", "setup", "run", "delete"],
        ),
        # star-jax saved on SIGTERM and exited 42 while the slice stayed: run again on the same slice.
        (["42", "0"], 2, 0, ["create", "scp", "setup", "run", "run", "delete"]),
        # The ssh session dropped while the slice is up: attach to the detached run again.
        (["255", "0"], 0, 0, ["create", "scp", "setup", "run", "attach", "delete"]),
        # A real failure is not retried; the slice is still deleted.
        (["1"], 5, 1, ["create", "scp", "setup", "run", "delete"]),
        # Restarts used up: the last exit status comes back.
        (["42", "42"], 1, 42, ["create", "scp", "setup", "run", "run", "delete"]),
    ],
)
def test_tpu_vm_restarts_on_preemption_and_always_deletes(tmp_path, codes, max_restarts, rc, ops):
    env = _fake_tools(tmp_path, gcloud=_FAKE_GCLOUD)
    env["TMPDIR"] = str(tmp_path)
    (tmp_path / "state").write_text("ABSENT\n")
    (tmp_path / "codes").write_text("\n".join(codes) + "\n")
    out = _run(
        "tpu_vm.sh",
        *("--name", "star3b", "--zone", "z", "--type", "v5p-16", "--capacity", "spot"),
        *("--max-restarts", str(max_restarts), "--", *TRAIN),
        env=env,
    )
    assert out.returncode == rc, out.stderr
    assert _gcloud_ops(tmp_path) == ops
    assert (tmp_path / "state").read_text().strip() == "ABSENT"
    # The code that went to the workers: this checkout's files, without the venv.
    with tarfile.open(tmp_path / "star_jax-star3b.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/tpu_vm.sh", "launch/requirements-tpu.txt", "setup.py"} <= names
    assert not any(n.startswith((".venv", ".git/")) for n in names)


def test_tpu_vm_never_takes_over_an_existing_queued_resource(tmp_path):
    env = _fake_tools(tmp_path, gcloud=_FAKE_GCLOUD)
    (tmp_path / "state").write_text("ACTIVE\n")
    out = _run("tpu_vm.sh", "--name", "star3b", "--zone", "z", "--type", "v5p-16", "--", *TRAIN, env=env)
    assert out.returncode == 2
    assert out.stderr == "tpu_vm.sh: --name=star3b: a queued resource of that name exists (ACTIVE)\n"
    assert _gcloud_ops(tmp_path) == []
    assert (tmp_path / "state").read_text().strip() == "ACTIVE"


def test_tpu_vm_worker_steps_dry_run():
    out = _run(
        "tpu_vm.sh",
        *("worker-run", "--dry-run", "--copy-in", "gs://b/data set=/tmp/data", "--log", "logs/r.log", "--", *TRAIN),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "mkdir -p /tmp/data",
        "gcloud storage rsync -r 'gs://b/data set' /tmp/data",
        "sudo lsof -t /dev/accel* /dev/vfio/* | sort -u | xargs -r sudo kill -9",
        "sudo rm -f /tmp/libtpu_lockfile",
        f"PATH={ROOT}/.venv/bin:$PATH setsid {shlex.join(TRAIN)} >logs/r.log 2>&1; echo $? >logs/r.log.exit",
    ]
    setup = _run("tpu_vm.sh", "worker-setup", "--dry-run", cwd=ROOT)
    assert setup.stdout.splitlines() == [
        "python3 -m pip install --user --quiet uv==0.13.9",
        f"{os.environ['HOME']}/.local/bin/uv venv --clear --quiet --python 3.11 .venv",
        f"{os.environ['HOME']}/.local/bin/uv pip install --quiet --python .venv/bin/python -r launch/requirements-tpu.txt",
        f"{os.environ['HOME']}/.local/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .",
    ]


def test_tpu_vm_worker_run_detaches_streams_worker_0_and_returns_the_exit_status(tmp_path):
    def start(worker: str, log: Path, *command: str) -> subprocess.Popen:
        argv = ["bash", str(LAUNCH / "tpu_vm.sh"), "worker-run", "--env", str(LAUNCH / "env/v5p.env")]
        return subprocess.Popen(
            [*argv, "--log", str(log), "--", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(STAR_TPU_WORKER_NUMBER=worker),
        )

    failing = ["bash", "-c", "echo out-line; echo err-line >&2; exit 42"]
    logs = {w: tmp_path / f"w{w}" / "run.log" for w in ["0", "1", "env"]}
    runs = {
        "0": start("0", logs["0"], *failing),
        "1": start("1", logs["1"], *failing),
        # The env file reaches the command.
        "env": start("0", logs["env"], "bash", "-c", 'echo "$LIBTPU_INIT_ARGS"'),
    }
    results = {w: (p.communicate(timeout=60), p.returncode) for w, p in runs.items()}
    for worker, streamed in [("0", True), ("1", False)]:
        (stdout, stderr), rc = results[worker]
        assert rc == 42, stderr
        assert logs[worker].read_text().splitlines() == ["out-line", "err-line"]
        assert Path(f"{logs[worker]}.exit").read_text().strip() == "42"
        assert ("out-line" in stdout) == streamed
    assert results["env"][1] == 0
    assert logs["env"].read_text().split() == V5P_FLAGS


# ---------------------------------------------------------------- XPK


def test_xpk_dry_run_pins_the_workload(tmp_path):
    out = _run(
        "xpk.sh",
        *("--cluster", "tpu-cluster", "--workload", "star3b-gen", "--tpu-type", "v5p-128", "--num-slices", "2"),
        *("--base-docker-image", "us-docker.pkg.dev/p/r/star-jax:1", "--build", "--max-restarts", "20"),
        *("--project", "my-proj", "--zone", "us-east5-a", "--dry-run", "--", *TRAIN),
        env=_env(TMPDIR=str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    stage = f"{tmp_path}/star_jax-xpk-star3b-gen"
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"rm -rf {stage} && mkdir -p {stage} && git -C {ROOT} ls-files")
    cmds = _commands("\n".join(lines[1:]))
    assert cmds[0] == [
        "docker",
        "build",
        "-f",
        f"{stage}/launch/Dockerfile",
        "-t",
        "us-docker.pkg.dev/p/r/star-jax:1",
        stage,
    ]
    assert cmds[1] == ["docker", "push", "us-docker.pkg.dev/p/r/star-jax:1"]
    assert cmds[2] == [
        *("xpk", "workload", "create", "--cluster=tpu-cluster", "--workload=star3b-gen", "--tpu-type=v5p-128"),
        *("--num-slices=2", "--project=my-proj", "--zone=us-east5-a"),
        *("--base-docker-image=us-docker.pkg.dev/p/r/star-jax:1", f"--script-dir={stage}"),
        *("--max-restarts=20", "--restart-on-exit-codes=42", "--termination-grace-period-seconds=300"),
        "--env=LIBTPU_INIT_ARGS=" + " ".join(V5P_FLAGS),
        "--command=cd /app && " + shlex.join(TRAIN),
    ]
    assert len(cmds) == 3


def test_xpk_dry_run_prebuilt_image_has_no_script_dir():
    out = _run(
        "xpk.sh",
        *("--cluster", "c", "--workload", "w", "--tpu-type", "v6e-256", "--docker-image", "img:2"),
        *("--env", "none", "--dry-run", "--", *TRAIN),
    )
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert "--docker-image=img:2" in cmd
    assert not any(a.startswith(("--script-dir", "--base-docker-image", "--env=")) for a in cmd)
    assert _option(cmd, "--max-restarts") == "10"


# ---------------------------------------------------------------- Slurm


@pytest.fixture
def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\n")
    (venv / "bin/python").chmod(0o755)
    return venv


def test_slurm_sh_dry_run_pins_sbatch(fake_venv):
    command = [*TRAIN[:-2], "--config.distributed.mode=explicit"]
    out = _run(
        "slurm.sh",
        *("--nodes", "4", "--partition", "gpu", "--account", "lab", "--time", "24:00:00"),
        *("--venv", str(fake_venv), "--env", "launch/env/h100.env", "--dry-run", "--", *command),
    )
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd == [
        *("sbatch", "--job-name=star-jax", "--nodes=4", "--gpus-per-node=8", f"--chdir={ROOT}"),
        *("--partition=gpu", "--account=lab", "--time=24:00:00", str(LAUNCH / "slurm.sbatch")),
        *("--env", str(LAUNCH / "env/h100.env"), "--venv", str(fake_venv)),
        *("--port", "8476", "--max-requeues", "20", "--", *command),
    ]


def test_slurm_sbatch_file_asks_one_process_per_node_and_requeue():
    directives = [
        line.split()[1] for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert "--ntasks-per-node=1" in directives
    assert "--requeue" in directives
    assert "--signal=TERM@300" in directives


_FAKE_SCONTROL = """#!/usr/bin/env bash
printf 'scontrol %s\\n' "$*" >> "$FAKE/calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; fi
"""
# Stand-in for srun: records its options, then runs the task command once as rank 1 of the job.
_FAKE_SRUN = """#!/usr/bin/env bash
printf 'srun' >> "$FAKE/calls"; while [[ "$1" == --* ]]; do printf ' %s' "$1" >> "$FAKE/calls"; shift; done
echo >> "$FAKE/calls"
SLURM_PROCID=1 "$@"
"""


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = _fake_tools(tmp_path, scontrol=_FAKE_SCONTROL, srun=_FAKE_SRUN)
    env.update(
        SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_ON_NODE="96", **extra
    )
    return env


def test_slurm_sbatch_dry_run_sets_coordinator_and_process_ids(tmp_path, fake_venv):
    out = _run(
        "slurm.sbatch",
        *("--venv", str(fake_venv), "--port", "9000", "--dry-run", "--", "star-jax", "train"),
        env=_slurm_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == [
        "export JAX_COORDINATOR_ADDRESS=gpu-a01:9000",
        "export JAX_NUM_PROCESSES=2",
        f'export PATH={fake_venv}/bin:"$PATH"',
    ]
    exported = dict(shlex.split(line)[1].split("=", 1) for line in lines[3:-1])
    assert exported["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exported["XLA_FLAGS"].split()
    assert shlex.split(lines[-1]) == [
        *("srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=96"),
        *("bash", "-c", 'JAX_PROCESS_ID=$SLURM_PROCID exec "$@"', "_", "star-jax", "train"),
    ]
    assert (tmp_path / "calls").read_text() == "scontrol show hostnames gpu-a[01-02]\n"


@pytest.mark.parametrize(
    "exit_code, restart_count, requeued",
    [(42, "0", True), (42, "19", True), (42, "20", False), (0, "0", False), (1, "0", False)],
)
def test_slurm_sbatch_requeues_only_after_a_preemption_save(tmp_path, fake_venv, exit_code, restart_count, requeued):
    report = tmp_path / "task_env"
    task = f'env | grep -E "^(JAX_|XLA_FLAGS=)" | sort > {report}; exit {exit_code}'
    out = _run(
        "slurm.sbatch",
        *("--venv", str(fake_venv), "--", "bash", "-c", task),
        env=_slurm_env(tmp_path, SLURM_RESTART_COUNT=restart_count),
    )
    assert out.returncode == exit_code, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert ("scontrol requeue 77" in calls) == requeued
    assert calls[1] == "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=96"
    task_env = dict(line.split("=", 1) for line in report.read_text().splitlines())
    assert task_env["JAX_COORDINATOR_ADDRESS"] == "gpu-a01:8476"
    assert task_env["JAX_NUM_PROCESSES"] == "2"
    assert task_env["JAX_PROCESS_ID"] == "1"
    assert "--xla_gpu_enable_pipelined_all_gather=true" in task_env["XLA_FLAGS"]


# ---------------------------------------------------------------- bad arguments


TPU = ["--name", "n", "--zone", "z", "--type", "v5p-16"]
XPK = ["--cluster", "c", "--workload", "w", "--tpu-type", "v5p-16", "--docker-image", "i"]


@pytest.mark.parametrize(
    "script, args, names",
    [
        ("tpu_vm.sh", ["--zone", "z", "--type", "v5p-8", "--", "echo"], "--name"),
        ("tpu_vm.sh", [*TPU, "--capacity", "preemptible", "--", "echo"], "--capacity=preemptible"),
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--type", "v5p", "--", "echo"], "--type=v5p"),
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--type", "v9x-8", "--", "echo"], "--runtime"),
        ("tpu_vm.sh", ["--name", "My_Run", "--zone", "z", "--type", "v5p-8", "--", "echo"], "--name=My_Run"),
        ("tpu_vm.sh", [*TPU, "--code", "git", "--repo", "r", "--", "echo"], "--ref"),
        ("tpu_vm.sh", [*TPU, "--max-restarts", "many", "--", "echo"], "--max-restarts=many"),
        ("tpu_vm.sh", [*TPU, "--env", "/etc/hostname", "--", "echo"], "--env=/etc/hostname"),
        ("tpu_vm.sh", [*TPU, "--zone"], "--zone needs a value"),
        ("tpu_vm.sh", [*TPU, "--copy-in", "gs://b/w=rel", "--", "echo"], "--copy-in=gs://b/w=rel"),
        ("tpu_vm.sh", TPU, "no command"),
        ("tpu_vm.sh", [*TPU, "--", *TRAIN[:-2]], "--config.distributed.mode=auto"),
        ("tpu_vm.sh", [*TPU, "--bogus", "--", "echo"], "--bogus"),
        ("xpk.sh", XPK[2:] + ["--", "echo"], "--cluster"),
        ("xpk.sh", [*XPK, "--base-docker-image", "j", "--", "echo"], "--docker-image and --base-docker-image"),
        ("xpk.sh", [*XPK, "--num-slices", "0", "--", "echo"], "--num-slices=0"),
        ("xpk.sh", [*XPK[:-2], "--", "echo"], "--docker-image"),
        ("xpk.sh", [*XPK, "--", *TRAIN[:-2]], "--config.distributed.mode=auto"),
        ("slurm.sh", ["--nodes", "0", "--", "echo"], "--nodes=0"),
        ("slurm.sh", ["--nodes", "2", "--port", "70000", "--", "echo"], "--port=70000"),
        ("slurm.sh", ["--nodes", "2", "--", *TRAIN], "--config.distributed.mode=explicit"),
        ("slurm.sh", ["--nodes", "2", "--venv", "/nonexistent", "--", "echo"], "--venv=/nonexistent"),
        ("slurm.sbatch", ["--", "echo"], "not inside a Slurm job"),
    ],
)
def test_bad_arguments_fail_with_one_line(script, args, names):
    out = _run(script, *args, "--dry-run") if "--" not in args else _run(script, "--dry-run", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"{script}: ") and names in out.stderr, out.stderr


# ---------------------------------------------------------------- env files and pins


def test_env_files_comment_every_setting():
    for name in ["v5p", "v6e", "h100"]:
        lines = (LAUNCH / "env" / f"{name}.env").read_text().splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith("#"):
                above = lines[i - 1]
                # A comment right above, or a run of settings of the same kind that one comment opens.
                grouped = above.startswith(line.split("=")[0].split("+")[0]) and "--xla" in line
                assert above.startswith("#") or grouped, f"{name}.env:{i + 1} has no comment: {line}"


def test_h100_xla_flags_are_accepted_by_the_installed_jaxlib():
    flags = subprocess.run(
        ["bash", "-c", f"source {LAUNCH}/common.sh; env_assignments {LAUNCH}/env/h100.env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    xla_flags = re.search(r"^XLA_FLAGS=(.*)$", flags, re.M).group(1)
    assert len(xla_flags.split()) == 9
    probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    runs = []
    # The flags as they are must parse; with a flag this jaxlib does not know, XLA must refuse.
    for extra, ok in [("", True), (" --xla_gpu_enable_async_collectives=true", False)]:
        env = _env(XLA_FLAGS=xla_flags + extra, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        runs.append((subprocess.Popen(probe, stderr=subprocess.PIPE, text=True, env=env), ok))
    for process, ok in runs:
        _, stderr = process.communicate(timeout=120)
        assert (process.returncode == 0) == ok, stderr[-2000:]


def test_requirements_tpu_pins_what_setup_py_pins():
    pins = dict(
        re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", line).groups()
        for line in (LAUNCH / "requirements-tpu.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    setup_pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (ROOT / "setup.py").read_text()))
    for package in ["jax", "flax", "orbax-checkpoint", "grain"]:
        assert pins[package] == setup_pins[package], package
    assert pins["jaxlib"] == pins["jax"]
    # jax[tpu]==0.10.2 requires libtpu==0.0.42.*.
    assert pins["libtpu"].startswith("0.0.42")
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    assert "pip install -r launch/requirements-tpu.txt" in dockerfile
    assert "pip install --no-deps -e ." in dockerfile
