"""`star-jax sweep --sweep configs/sweeps/<name>.py --workdir runs/<name>`: a scaling sweep.

Expands the sweep file's `get_sweep()` (and `get_shared()`), checks every override key against
its config, then trains every run not finished yet under `<workdir>/<run name>/` (shared runs
first, into `<workdir>/shared/`), ends each with its loss on the fixed held-out set and appends
it to `<workdir>/manifest.jsonl` with its FLOPs, parameters and tokens. A rerun skips finished
runs and resumes an interrupted one; SIGTERM saves the running one and stops. A run whose loss
goes non-finite is recorded as diverged and left out of the fits, with a note.

  --dry_run (--dry-run)  list the runs with their FLOPs, parameters and tokens; nothing runs
  --print_commands       one `star-jax train` command per run (for a scheduler / launch scripts)
  --aot TOPOLOGY         `star-jax aot` on every run for a TPU slice (e.g. v5p-128): fits or not
  --report               fit the scaling laws to the manifest and write report.md + plots to --out
                         (default <workdir>/report)

Every mistake is one line before anything runs: a sweep file that does not exist or has no
get_sweep(), an override key the config does not have (the closest key named), two runs with
the same name.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys

import jax
from absl import flags

from star_jax import sweep, train
from star_jax.cli import aot, common
from star_jax.scaling import report

USAGE = "--sweep configs/sweeps/<name>.py and --workdir DIR are required"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("sweep", None, "sweep file defining get_sweep()", flag_values=fv)
    flags.DEFINE_string(
        "workdir", None, "the sweep's directory: one subdirectory per run + manifest.jsonl", flag_values=fv
    )
    flags.DEFINE_boolean("dry_run", False, "list the runs with FLOPs and params; run nothing", flag_values=fv)
    flags.DEFINE_boolean("print_commands", False, "print one `star-jax train` command per run", flag_values=fv)
    flags.DEFINE_string("aot", None, "compile every run's step for this TPU slice (star-jax aot)", flag_values=fv)
    flags.DEFINE_boolean("report", False, "fit, plot and write report.md from the manifest", flag_values=fv)
    flags.DEFINE_string("out", None, "directory of --report (default <workdir>/report)", flag_values=fv)
    flags.DEFINE_integer("bootstrap", 100, "bootstrap refits of L(N, D) for its intervals (--report)", flag_values=fv)


def _config_path(module_name: str) -> str:
    """The config file of `module_name` as a `--config` path (relative to the cwd when inside it)."""
    path = importlib.import_module(module_name).__file__
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _value(value) -> str:
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def config_args(run: sweep.Run, config_path: str) -> list[str]:
    """`--config FILE:ARG` and one `--config.key=value` per override of `run` (unquoted)."""
    args = ["--config", f"{config_path}:{run.overrides.get('config_arg', '')}".rstrip(":")]
    for key, value in run.overrides.items():
        if key not in sweep.NOT_CONFIG_KEYS:
            args.append(f"--config.{key}={_value(value)}")
    return args


def train_command(run: sweep.Run, workdir: str, config_path: str) -> str:
    """The `star-jax train` command line of `run` (shell-quoted)."""
    args = ["star-jax", "train", *config_args(run, config_path), "--workdir", sweep.run_dir(workdir, run)]
    return " ".join(shlex.quote(a) for a in args)


def _dry_run(shared, runs, workdir) -> None:
    latest = sweep.Manifest(workdir).latest() if os.path.isdir(workdir) else {}
    print("| run | stage | steps | FLOPs | trainable | non-embedding | frozen | target tokens | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = 0.0
    for run in shared + runs:
        a = sweep.accounting(run.config)
        total += a["flops"]
        status = latest.get(sweep.run_key(run), {}).get("status", "to run")
        print(
            f"| {sweep.run_key(run)} | {run.config.stage} | {run.config.train.num_steps} | {a['flops']:.3g} | "
            f"{a['trainable_params']:,} | {a['non_embedding_params']:,} | {a['frozen_params']:,} | "
            f"{a['target_tokens']:,} | {status} |"
        )
    print(f"{len(shared) + len(runs)} runs ({len(shared)} shared), {total:.3g} training FLOPs in all")


def _aot(prog, shared, runs, topology: str, config_path: str) -> int:
    failed = []
    for run in shared + runs:
        print(f"[sweep] aot {sweep.run_key(run)} on {topology}", flush=True)
        rc = aot.main([f"{prog.rsplit(' ', 1)[0]} aot", *config_args(run, config_path), f"--topology={topology}"])
        if rc != 0:
            failed.append((sweep.run_key(run), rc))
    if failed:
        print(f"[sweep] {len(failed)} of {len(shared) + len(runs)} runs do not fit or failed: {failed}")
        return 1
    print(f"[sweep] all {len(shared) + len(runs)} runs fit {topology}")
    return 0


def main(argv: list[str]) -> int:
    argv = [a.replace("--dry-run", "--dry_run", 1) if a.startswith("--dry-run") else a for a in argv]
    fv = flags.FlagValues()
    _define(fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    if fv.sweep is None or fv.workdir is None:
        common.usage_error(prog, USAGE)
    if fv.report:
        try:
            out_dir = fv.out or os.path.join(fv.workdir, "report")
            path = report.write_report(fv.workdir, out_dir, sweep_file=fv.sweep, bootstrap=fv.bootstrap)
        except ValueError as e:
            return common.error(prog, e)
        print(f"[sweep] report: {path}")
        return 0
    try:
        shared, runs, heldout_cfg = sweep.expand(fv.sweep, fv.workdir)
    except sweep.SweepError as e:
        return common.error(prog, e)
    if fv.dry_run:
        _dry_run(shared, runs, fv.workdir)
        return 0
    module = sweep.load_module(fv.sweep)
    config_path = _config_path(getattr(module, "CONFIG", "star_jax.configs.star"))
    if fv.print_commands:
        for run in shared + runs:
            print(train_command(run, fv.workdir, config_path))
        return 0
    if fv.aot:
        return _aot(prog, shared, runs, fv.aot, config_path)
    os.makedirs(fv.workdir, exist_ok=True)
    common.log_to(os.path.join(fv.workdir, "star_jax.log"))
    # Runs of one size share their model-building, init and evaluation programs: compile them once.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(fv.workdir), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    print(
        f"[sweep] {len(runs)} runs (+{len(shared)} shared) on {jax.device_count()} device(s) -> {fv.workdir}",
        flush=True,
    )
    try:
        latest = sweep.execute(shared + runs, fv.workdir, heldout_cfg, out=lambda s: print(s, flush=True))
    except (ValueError, train.NonFiniteError) as e:
        return common.error(prog, e)
    statuses = [latest.get(sweep.run_key(r), {}).get("status") for r in shared + runs]
    finished = sum(s in ("finished", "diverged") for s in statuses)
    print(f"[sweep] {finished}/{len(statuses)} runs done ({statuses.count('diverged')} diverged)", flush=True)
    return 0 if finished == len(statuses) else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
