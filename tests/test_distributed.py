"""star_jax.distributed: settings checked before anything starts (one line naming the setting), the
per-step preemption check in one process, the single writer. The multi-process behaviour itself is
proved in tests/test_multihost.py."""

from __future__ import annotations

import os
import signal

import jax
import pytest
import train_fixtures
from absl import flags

from star_jax import distributed
from star_jax.cli import common


def test_explicit_mode_names_a_missing_env_var(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="mode='explicit' needs JAX_PROCESS_ID"):
        distributed.initialize("explicit")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(distributed.DistributedError, match=r"JAX_PROCESS_ID=2 is outside \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.initialize("explicit")
    with pytest.raises(distributed.DistributedError, match="config.distributed.mode='pod' is not one of"):
        distributed.initialize("pod")


def test_a_batch_that_does_not_divide_by_the_processes_is_named(monkeypatch):
    cfg = train_fixtures.config()
    cfg.train.batch_size = 9
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(
        distributed.DistributedError, match="config.train.batch_size=9 is not divisible by the 2 processes"
    ):
        distributed.check_run(cfg, "/nonexistent")


def test_one_process_preemption_reports_sigterm_at_the_next_step():
    with distributed.Preemption() as preempt:
        assert not preempt.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.reached(2)
    assert signal.getsignal(signal.SIGTERM) is not preempt._handle  # the old handler is back


def test_off_is_one_process_and_process_0_writes():
    distributed.initialize("off")
    assert jax.process_count() == 1 and distributed.is_writer()
    distributed.barrier("nothing to wait for")
    assert distributed.all_gather_str("x") == ["x"]


def test_every_command_takes_distributed_and_refuses_a_bad_start_in_one_line(monkeypatch, capsys):
    """Commands without a config (generate, edit, ...) parse through `common.parse_flags`, which
    defines `--distributed` and starts the runtime before the command touches a device."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        common.parse_flags(flags.FlagValues(), ["star-jax generate", "--distributed=explicit"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "star-jax generate: config.distributed.mode='explicit' needs JAX_COORDINATOR_ADDRESS "
        "(set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
    ]
    fv = flags.FlagValues()
    common.parse_flags(fv, ["star-jax generate"])
    assert fv.distributed == "off"
