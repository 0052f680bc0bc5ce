"""Multi-process start and coordination: `jax.distributed` for TPU pods, Slurm / GKE GPU clusters
and CPU hosts, called by every command before anything touches a device.

  initialize / initialize_from_config   start (or not) the distributed runtime:
      off       one process (the default; a single CPU / GPU / TPU host)
      auto      what `jax.distributed.initialize()` detects: TPU VM metadata, Slurm, Open MPI
      explicit  JAX_COORDINATOR_ADDRESS (host or host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID, and
                optionally JAX_LOCAL_DEVICE_IDS ("0,1")
    plus the persistent compilation cache (`config.distributed.compilation_cache_dir`, a bucket
    shared by every host on a pod).
  check_run     what a multi-process run must agree on before it builds anything: the global batch
                divides by the process count; every process sees the same workdir.
  is_writer     whether this process writes run-level files (process 0 only).
  barrier       every process waits here (the coordination service; touches no device).
  Preemption    the per-step preemption check: on SIGTERM (or a TPU maintenance notice) every
                process reaches the same step, saves it and exits with PREEMPTED_EXIT_CODE.

Every failure at start is one line naming the setting (`DistributedError`, a ValueError). A
coordinator that never answers would make jax abort with a C++ stack after its own timeout; a
watchdog says which address did not answer first and exits 2.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import jax
from etils import epath
from jax.experimental import multihost_utils

MODES = ("off", "auto", "explicit")
# `star-jax train` exits with this status after a coordinated preemption save: launch scripts
# treat it as "restart the same command" (the run resumes from the step it saved).
PREEMPTED_EXIT_CODE = 42
ENV_ADDRESS, ENV_COUNT, ENV_INDEX, ENV_DEVICES = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
)
_keys = itertools.count()  # barrier / key-value names, the same sequence on every process


class DistributedError(ValueError):
    """A multi-process setting that cannot work; the message is one line naming it."""


def initialize_from_config(config) -> None:
    """`initialize` with `config.distributed` (mode, coordinator_port, timeout_s, compilation_cache_dir)."""
    d = config.distributed
    initialize(
        d.mode,
        coordinator_port=d.coordinator_port,
        timeout_s=d.timeout_s,
        compilation_cache_dir=d.compilation_cache_dir,
    )


def initialize(
    mode: str = "off", *, coordinator_port: int = 8476, timeout_s: int = 300, compilation_cache_dir: str = ""
) -> None:
    """Starts the distributed runtime in `mode` (off | auto | explicit); a second call is a no-op.

    coordinator_port: used when the coordinator address names none (explicit mode) and in place of
    the detected one in auto mode. timeout_s: how long a process waits for all of them to connect.
    compilation_cache_dir: a persistent XLA compilation cache ("" = leave jax's setting alone).
    Raises DistributedError (one line) on a bad mode, missing or malformed env vars, a process
    count that disagrees with the coordinator's, or a coordinator that does not answer."""
    if mode not in MODES:
        raise DistributedError(f"config.distributed.mode={mode!r} is not one of {', '.join(MODES)}")
    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir))
    if mode == "off" or jax.distributed.is_initialized():
        return
    if mode == "explicit":
        address, count, index, devices = _explicit_settings(coordinator_port)
    else:
        address, count, index, devices = _detected_settings(coordinator_port, timeout_s)
    if index != 0:
        _wait_for_coordinator(address, timeout_s)
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(done, address, count, index, timeout_s), daemon=True).start()
    try:
        jax.distributed.initialize(
            address,
            count,
            index,
            local_device_ids=devices,
            # jax's own limit comes later than the watchdog's, which gives the clear message.
            initialization_timeout=int(timeout_s) + 60,
        )
    finally:
        done.set()
    # Every process says how many it was told there are, so that all of them stop on a mismatch.
    told = all_gather_str(str(count), timeout_s)
    wrong = [i for i, n in enumerate(told) if int(n) != jax.process_count()]
    if wrong:
        raise DistributedError(
            f"{ENV_COUNT}={told[wrong[0]]} on process {wrong[0]} but the coordinator at {address} counts "
            f"{jax.process_count()} processes: start every process with the same {ENV_COUNT}"
        )
    logging.info("distributed: process %d of %d, coordinator %s", index, count, address)


def _explicit_settings(port: int) -> tuple[str, int, int, list[int] | None]:
    values = {}
    for name in (ENV_ADDRESS, ENV_COUNT, ENV_INDEX):
        value = os.environ.get(name, "").strip()
        if not value:
            raise DistributedError(
                f"config.distributed.mode='explicit' needs {name} (set {ENV_ADDRESS}, {ENV_COUNT}, {ENV_INDEX})"
            )
        values[name] = value
    count, index = (_env_int(name, values[name]) for name in (ENV_COUNT, ENV_INDEX))
    if count < 1:
        raise DistributedError(f"{ENV_COUNT}={count} must be at least 1")
    if not 0 <= index < count:
        raise DistributedError(f"{ENV_INDEX}={index} is outside [0, {ENV_COUNT}={count})")
    devices = None
    if raw := os.environ.get(ENV_DEVICES, "").strip():
        try:
            devices = [int(x) for x in raw.split(",")]
        except ValueError:
            raise DistributedError(f"{ENV_DEVICES}={raw!r} is not a comma-separated list of integers") from None
    return _with_port(values[ENV_ADDRESS], port), count, index, devices


def _detected_settings(port: int, timeout_s: int) -> tuple[str, int, int, list[int] | None]:
    from jax._src import clusters  # what jax.distributed.initialize() itself consults

    try:
        address, count, index, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, int(timeout_s)
        )
    except Exception as e:  # no cluster environment, or its metadata server did not answer
        raise DistributedError(
            f"config.distributed.mode='auto' found no TPU pod, Slurm job or Open MPI launch ({_one_line(e)}); "
            f"use mode=explicit with {ENV_ADDRESS}, {ENV_COUNT}, {ENV_INDEX}"
        ) from None
    if address is None or count is None or index is None:
        raise DistributedError(
            "config.distributed.mode='auto' found no TPU pod, Slurm job or Open MPI launch; "
            f"use mode=explicit with {ENV_ADDRESS}, {ENV_COUNT}, {ENV_INDEX}"
        )
    host = address.rsplit(":", 1)[0] if address.rstrip("]").count(":") else address  # the detected address has a port
    return f"{host}:{int(port)}", int(count), int(index), devices


def _with_port(address: str, port: int) -> str:
    """host -> host:port; host:port and [v6]:port as given."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{int(port)}"
    return address if ":" in address else f"{address}:{int(port)}"


def _env_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Waits until the coordinator's port accepts a TCP connection; one line naming it when it never does."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"the coordinator at {address} ({ENV_ADDRESS} / config.distributed.coordinator_port) did not "
                    f"answer within config.distributed.timeout_s={timeout_s} s"
                ) from None
            time.sleep(0.5)


def _watchdog(done: threading.Event, address: str, count: int, index: int, timeout_s: int) -> None:
    """Exits the process with one line when `jax.distributed.initialize` has not returned in time
    (jax would abort later with a C++ stack); process 0 waits there for every other process."""
    if done.wait(timeout_s):
        return
    who = "not every process connected to" if index == 0 else "no answer from"
    print(
        f"star-jax: {who} the coordinator at {address} within config.distributed.timeout_s={timeout_s} s "
        f"({ENV_COUNT}={count}, {ENV_INDEX}={index}): check that every process runs with the same "
        f"{ENV_COUNT} and can reach that address",
        file=sys.stderr,
        flush=True,
    )
    os._exit(2)


# -- what every process must agree on ---------------------------------------------------------------


def is_writer() -> bool:
    """Whether this process writes run-level files (config, markers, metrics, sample grids): process 0."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed  # the key-value store of the coordination service

    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: int = 600) -> None:
    """Every process waits here until all have arrived; a no-op in one process. `name` only labels
    the barrier (calls must happen in the same order on every process)."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"star_jax/{next(_keys)}/{name}", int(timeout_s * 1000))


def all_gather_str(value: str, timeout_s: int = 600) -> list[str]:
    """`value` of every process, in process order (through the coordination service's key-value
    store; touches no device). One process: [value]."""
    if jax.process_count() == 1:
        return [value]
    key = f"star_jax/gather/{next(_keys)}"
    client = _client()
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    return [client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)) for i in range(jax.process_count())]


def broadcast_from_0(value: str, timeout_s: int = 600) -> str:
    """Process 0's `value` on every process (decisions one process takes for all, e.g. a save that
    is due by wall time). One process: `value`."""
    return all_gather_str(value if is_writer() else "", timeout_s)[0]


def check_run(config, workdir: str) -> None:
    """Checks what every process of a run must share, before anything is built: the global batch
    `config.train.batch_size` divides by the process count, and every process reads and writes the
    same `workdir` (each writes a probe file there and must see every other's). Raises
    DistributedError, one line, on every process alike. A no-op in one process."""
    count = jax.process_count()
    if count == 1:
        return
    batch = config.train.batch_size
    if batch % count:
        raise DistributedError(f"config.train.batch_size={batch} is not divisible by the {count} processes")
    token = all_gather_str(uuid.uuid4().hex if is_writer() else "")[0]
    probe_dir = epath.Path(workdir) / f".star_jax_probe_{token}"
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / f"process_{jax.process_index()}").write_text(str(os.getpid()))
    barrier("workdir probes written")
    seen = sorted(int(p.name.split("_")[1]) for p in probe_dir.iterdir() if p.name.startswith("process_"))
    views = all_gather_str(",".join(map(str, seen)))
    barrier("workdir probes read")
    if is_writer():
        for p in probe_dir.iterdir():
            p.unlink()
        probe_dir.rmdir()
    blind = [i for i, view in enumerate(views) if view != ",".join(map(str, range(count)))]
    if blind:
        raise DistributedError(
            f"--workdir {workdir} is not shared by all {count} processes (process {blind[0]} does not see what the "
            "others wrote there): use a bucket (gs://...) or a filesystem every host mounts"
        )


# -- preemption -------------------------------------------------------------------------------------


class Preemption:
    """Per-step preemption check, the same step on every process.

    With the distributed runtime, `reached(step)` is jax's preemption sync point: when any process
    receives SIGTERM (or a TPU maintenance notice), every process answers True at the same step.
    In one process, SIGTERM sets a flag that `reached` reports at the next step. Use as a context
    manager around the loop (the one-process handler is restored on exit)."""

    def __init__(self):
        self.requested = False
        self._old = None
        self._coordinated = jax.process_count() > 1

    def __enter__(self):
        if not self._coordinated:  # the coordination service installs its own SIGTERM notifier
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (some test runners): no handler
                self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and exiting at the next step boundary")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (call once per step, with increasing steps, on every process)."""
        if self._coordinated:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
