"""Multi-host proof on one CPU: 2 processes x 4 CPU devices on localhost with `jax.distributed`
(explicit mode: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) train the trainer-test
task (tests/multihost_worker.py) and are compared with 1 process x 8 devices fed the same global
batches; SIGTERM to one process stops both at the same step with the restart code; bad settings
stop every process at start with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_fixtures

from star_jax import checkpointing, distributed, optim, sharding, train_step

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or "CACHE" in k}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"  # not the parent's 8
    env["PYTHONPATH"] = HERE + os.pathsep + ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env | {k: str(v) for k, v in extra.items()}


def _start_pair(cmd_for, port: int | None = None, env_for=lambda i: {}) -> list[subprocess.Popen]:
    """Two processes of one distributed run; `cmd_for(i)` is process i's command line. Process 1
    runs with umask 077, so every file it creates is mode 0600 (process 0's: 0644)."""
    port = port or _free_port()
    procs = []
    for i in (0, 1):
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)
        procs.append(
            subprocess.Popen(
                cmd_for(i),
                env=env | {k: str(v) for k, v in env_for(i).items()},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                umask=0o077 if i == 1 else 0o022,
            )
        )
    return procs


def _finish(procs, timeout=300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def _worker(workdir, steps, rows_dir):
    return lambda i: [sys.executable, os.path.join(HERE, "multihost_worker.py"), workdir, str(steps), "multi", rows_dir]


def _losses(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "understanding", "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def _abstract_state(devices, ici):
    """The trainer's state tree for the worker's task on a mesh of `devices`, nothing allocated."""
    cfg = train_fixtures.config(STEPS, ici)
    task = train_fixtures.task(cfg)
    mesh = sharding.make_mesh(ici, (1, 1, 1), devices=devices)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        _, state, _ = train_step.abstract_state(
            task.build_model, list(cfg.train.trainable), optim.make_optimizer(cfg.train), mesh, sharding.DEFAULT_RULES
        )
    return state


def _flat(tree) -> dict[str, object]:
    """path -> leaf, with dict keys, sequence indices and named-tuple fields spelled alike."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {"/".join(map(name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (1 x 8, same global batches) and an uninterrupted 2 x 4 run of STEPS steps."""
    root = tmp_path_factory.mktemp("multihost")
    ref, two, rows = str(root / "ref"), str(root / "two"), str(root / "rows")
    os.makedirs(rows)
    pair = _start_pair(_worker(two, STEPS, rows))
    reference = subprocess.run(
        [sys.executable, os.path.join(HERE, "multihost_worker.py"), ref, str(STEPS), "reference"],
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    for rc, text in _finish(pair):
        assert rc == 0, text
    return {"ref": ref, "two": two, "rows": rows}


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(runs):
    ref, two = _losses(runs["ref"]), _losses(runs["two"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(two[step] - ref[step]) <= 1e-5, (step, two[step], ref[step])
    # Each process read its own shard: no record twice, together one global batch per step.
    rows = [open(os.path.join(runs["rows"], f"rows_{i}.txt")).read().split() for i in (0, 1)]
    local = train_fixtures.config().train.batch_size // 2
    consumed = [r[: STEPS * local] for r in rows]
    assert all(len(r) == STEPS * local for r in consumed)
    assert not set(consumed[0]) & set(consumed[1])
    assert len(set(consumed[0]) | set(consumed[1])) == STEPS * 2 * local


@pytest.mark.slow
def test_only_process_0_writes_run_level_files(runs):
    stage = os.path.join(runs["two"], "understanding")
    for name in ("config.json", "DONE", "metrics.jsonl"):
        assert os.stat(os.path.join(stage, name)).st_mode & 0o777 == 0o644, name  # process 1's would be 0600
    with open(os.path.join(stage, "metrics.jsonl")) as f:
        assert len(f.readlines()) == STEPS  # one line per step, not one per process
    assert not [n for n in os.listdir(runs["two"]) if n.startswith(".star_jax_probe")]
    # Process 1 did write its part of every checkpoint (its Grain state, its shards' files).
    step_dir = os.path.join(stage, "ckpt", str(STEPS))
    mine = [
        os.path.join(d, f)
        for d, _, files in os.walk(step_dir)
        for f in files
        if os.stat(os.path.join(d, f)).st_mode & 0o077 == 0
    ]
    assert any(f.endswith("process_1-of-2.json") for f in mine), mine


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_in_one_on_8_and_on_4_devices(runs):
    ckpts = checkpointing.StageCheckpoints(runs["two"], "understanding", read_only=True)
    saved = _flat(ckpts.read_state(STEPS))
    assert int(saved["step"]) == STEPS and len(saved) > 20
    for devices, ici in ((jax.devices(), (8, 1, 1)), (jax.devices()[:4], (2, 2, 1))):
        restored = _flat(ckpts.restore(STEPS, _abstract_state(devices, ici)))
        assert set(restored) == set(saved)
        for key, value in restored.items():
            assert value.sharding.device_set <= set(devices), key
            np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[key]), err_msg=key)
    # The input positions are per process: resuming them in another number of processes is refused.
    with pytest.raises(checkpointing.ResumeError, match="written by 2 processes and this run has 1"):
        ckpts.restore(STEPS, _abstract_state(jax.devices(), (8, 1, 1)), train_fixtures.make_iterator(8)(0, 1))
    ckpts.close()


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes_bit_exactly(runs, tmp_path):
    workdir, rows = str(tmp_path / "w"), str(tmp_path / "rows")
    os.makedirs(rows)
    pair = _start_pair(_worker(workdir, STEPS, rows), env_for=lambda i: {"STAR_JAX_TEST_SLOW_DATA_S": "0.3"})
    metrics_file = os.path.join(workdir, "understanding", "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in pair):
        if os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 2:
            pair[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    results = _finish(pair)
    saved = []
    for rc, text in results:
        assert rc == distributed.PREEMPTED_EXIT_CODE, text
        saved += [int(line.split("saved step ")[1].split(",")[0]) for line in text.splitlines() if "saved step" in line]
    assert len(saved) == 2 and saved[0] == saved[1] < STEPS, saved
    ckpts = checkpointing.StageCheckpoints(workdir, "understanding", read_only=True)
    assert ckpts.latest_step() == saved[0] and not ckpts.is_done()
    ckpts.close()
    for rc, text in _finish(_start_pair(_worker(workdir, STEPS, rows))):  # the same command again
        assert rc == 0, text
    assert _losses(workdir) == _losses(runs["two"])  # every step, bit for bit


# -- bad settings: one line, at start -----------------------------------------------------------------

TRAIN = [
    sys.executable,
    "-m",
    "star_jax.main",
    "train",
    "--config",
    "configs/star.py:size=tiny,stage=generation,runlocal",
]


def test_a_coordinator_that_never_answers_is_named(tmp_path):
    port = _free_port()
    env = _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1)
    cmd = TRAIN + ["--workdir", str(tmp_path), "--config.distributed.mode=explicit", "--config.distributed.timeout_s=2"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert f"the coordinator at localhost:{port}" in line and "did not answer within" in line, p.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_mismatched_process_counts_and_an_unshared_workdir_stop_both_processes(tmp_path):
    base = TRAIN + ["--config.distributed.mode=explicit", "--config.distributed.timeout_s=60"]
    workdirs = [str(tmp_path / "host0"), str(tmp_path / "host1")]  # as if each host had its own disk
    results = _finish(_start_pair(lambda i: base + ["--workdir", workdirs[i]]), timeout=180)
    for rc, text in results:
        assert rc == 2, text
        assert "is not shared by all 2 processes" in text.strip().splitlines()[-1], text
    results = _finish(
        _start_pair(lambda i: base + ["--workdir", workdirs[0]], env_for=lambda i: {"JAX_NUM_PROCESSES": 2 + i}),
        timeout=180,
    )
    for rc, text in results:
        assert rc == 2, text
        assert "JAX_NUM_PROCESSES=3 on process 1 but the coordinator" in text.strip().splitlines()[-1], text
