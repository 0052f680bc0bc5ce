"""The sweep runner: expansion, names, bad input, dry run / commands, and a killed sweep resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from star_jax import checkpointing, sweep
from star_jax.cli import sweep as sweep_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "size=tiny,stage=generation,runlocal=True"


def _write(tmp_path, body: str, name: str = "s.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_expand_builds_checked_configs_and_stable_names(tmp_path):
    path = _write(
        tmp_path,
        f"""
from star_jax.configs.sweeps import hyper
def get_sweep():
    return hyper.product([hyper.fixed("config_arg", "{TINY}"), hyper.sweep("train.lr", [1e-3, 3e-3]),
                          hyper.sweep("model.star.stack_layers", [1, 2])])
""",
    )
    shared, runs, heldout = sweep.expand(path, str(tmp_path / "w"))
    assert not shared and len(runs) == 4 and heldout["split"] == "validation"
    names = [r.name for r in runs]
    assert len(set(names)) == 4 and all(n.startswith("stack-layers=") and ",lr=" in n for n in names)
    assert runs[3].config.train.lr == 3e-3 and runs[3].config.model.star.stack_layers == 2
    assert names == [r.name for r in sweep.expand(path, str(tmp_path / "w"))[1]]  # stable


@pytest.mark.parametrize(
    "body, named",
    [
        (f"def get_sweep():\n    return [{{'config_arg': '{TINY}', 'train.lrr': 1e-3}}]", ["train.lrr", "train.lr"]),
        (f"def get_sweep():\n    return [{{'config_arg': '{TINY}', 'model.stak.x': 1}}]", ["model.stak.x"]),
        ("def get_config():\n    return None", ["get_sweep"]),
        (f"def get_sweep():\n    return [{{'config_arg': '{TINY}'}}] * 2", ["same name"]),
        (
            f"def get_sweep():\n    return [{{'config_arg': '{TINY}', 'name': 'a', 'train.lr': 1.0}},"
            f" {{'config_arg': '{TINY}', 'name': 'a'}}]",
            ["'a'", "same name"],
        ),
        (f"def get_sweep():\n    return [{{'config_arg': '{TINY}', 'train.batch_size': 'big'}}]", ["train.batch_size"]),
    ],
)
def test_bad_sweeps_are_one_line_naming_the_problem(tmp_path, capsys, body, named):
    path = _write(tmp_path, body)
    workdir = tmp_path / "w"
    code = sweep_cli.main(["star-jax sweep", f"--sweep={path}", f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for text in named:
        assert text in err
    assert not workdir.exists()  # nothing ran, nothing was written


def test_a_missing_sweep_file_is_one_line(tmp_path, capsys):
    code = sweep_cli.main(["star-jax sweep", f"--sweep={tmp_path}/nope.py", f"--workdir={tmp_path}/w"])
    assert code == 2 and "nope.py" in capsys.readouterr().err


def test_the_shipped_sweeps_expand_and_print_commands(tmp_path, capsys):
    for name in ("stack_depth", "ladder"):
        shared, runs, _ = sweep.expand(os.path.join(REPO, "configs", "sweeps", f"{name}.py"), str(tmp_path))
        assert runs
        for run in runs:
            line = sweep_cli.train_command(run, str(tmp_path), "configs/star.py")
            assert (
                line.startswith("star-jax train --config configs/star.py:")
                and sweep.run_dir(str(tmp_path), run) in line
            )
    code = sweep_cli.main(
        [
            "star-jax sweep",
            "--sweep",
            os.path.join(REPO, "configs/sweeps/stack_depth.py"),
            f"--workdir={tmp_path}/w",
            "--print_commands",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 4 and all("--config.model.star." in line for line in out)


SMALL = f"""
COMMON = {{"config_arg": "{TINY}", "model.star.stack_init": "random", "train.init_from": (),
          "train.ckpt_every": 5, "train.log_every": 5, "train.warmup_steps": 1}}
HELDOUT = {{"split": "validation", "num_examples": 16, "batch_size": 8}}
def get_sweep():
    return [COMMON | {{"train.num_steps": 6}}, COMMON | {{"train.num_steps": 400}}]
"""


def _events(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "manifest.jsonl"))]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    path = _write(tmp_path, SMALL)
    workdir = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "star_jax.main", "sweep", f"--sweep={path}", f"--workdir={workdir}"]
    _, runs, _ = sweep.expand(path, workdir)
    first, second = (sweep.run_dir(workdir, r) for r in runs)
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the runs compile faster
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill -9 once the second run has a complete checkpoint
        deadline = time.time() + 900
        while not (
            os.path.isdir(os.path.join(second, "generation"))
            and checkpointing.complete_steps(os.path.join(second, "generation"))
        ):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not checkpointing.is_stage_done(second, "generation")
    first_metrics = open(os.path.join(first, "generation", "metrics.jsonl")).read()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    events = _events(workdir)
    starts = [e["run"] for e in events if e["status"] == "started"]
    assert starts.count(runs[0].name) == 1 and starts.count(runs[1].name) == 2  # the first never reran
    resumed = [e for e in events if e["status"] == "started" and e["run"] == runs[1].name][-1]
    assert resumed["resumed"] is True
    finished = {e["run"]: e for e in events if e["status"] == "finished"}
    assert set(finished) == {runs[0].name, runs[1].name}
    for e in finished.values():
        assert e["heldout_examples"] == 16 and e["heldout_loss"] > 0 and e["flops"] > 0 and e["target_tokens"] > 0
    assert open(os.path.join(first, "generation", "metrics.jsonl")).read() == first_metrics
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "2 of 2 runs already finished" in again.stdout


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = _write(tmp_path, SMALL.replace("400", "7"))
    workdir = str(tmp_path / "w")
    _, runs, heldout = sweep.expand(path, workdir)

    def fake_train(config, directory):
        if config.train.num_steps == 6:
            raise sweep.train.NonFiniteError("[generation] non-finite loss nan at step 3")
        os.makedirs(os.path.join(directory, "generation"))
        open(os.path.join(directory, "generation", "DONE"), "w").write("{}")
        return {"loss": 1.0}

    lines = []
    latest = sweep.execute(
        runs,
        workdir,
        heldout,
        train_fn=fake_train,
        out=lines.append,
        evaluate=lambda directory, stage, **kw: {"loss": 2.5, "finite": True, "examples": 16},
    )
    assert latest[runs[0].name]["status"] == "diverged" and "step 3" in latest[runs[0].name]["note"]
    assert latest[runs[1].name]["status"] == "finished" and latest[runs[1].name]["heldout_loss"] == 2.5
    assert any("diverged" in line for line in lines)
    # a rerun does not retry the diverged run
    assert (
        sweep.execute(runs, workdir, heldout, train_fn=fake_train, out=lines.append)[runs[0].name]["status"]
        == "diverged"
    )


def test_dry_run_lists_flops_and_params_and_aot_checks_every_run(tmp_path, capsys, monkeypatch):
    path = os.path.join(REPO, "configs/sweeps/stack_depth.py")
    code = sweep_cli.main(["star-jax sweep", f"--sweep={path}", f"--workdir={tmp_path}/w", "--dry-run"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| stack-layers=") or line.startswith("| stack-init=")]
    assert code == 0 and len(rows) == 4 and "training FLOPs in all" in out
    flops_by_depth = [float(r.split("|")[4]) for r in rows[:3]]
    assert flops_by_depth == sorted(flops_by_depth)  # deeper stacks cost more per step
    seen = []
    monkeypatch.setattr(sweep_cli.aot, "main", lambda argv: seen.append(argv) or (1 if len(seen) == 2 else 0))
    code = sweep_cli.main(["star-jax sweep", f"--sweep={path}", f"--workdir={tmp_path}/w", "--aot=v5p-128"])
    assert code == 1 and len(seen) == 4  # one run does not fit: exit 1, every run still checked
    assert seen[0][0] == "star-jax aot" and "--topology=v5p-128" in seen[0]
    assert any(a.startswith("--config=") or a == "--config" for a in seen[0])
    assert "1 of 4 runs do not fit" in capsys.readouterr().out
