"""Scaling sweeps: a sweep file's runs, their names, a JSONL manifest, and running them with resume.

A sweep file (`configs/sweeps/<name>.py`) defines `get_sweep()`, a list of override dicts: the
`config_arg` entry is the argument of the config module's `get_config` (default
`star_jax.configs.star`, or the file's `CONFIG`), every other key a dotted config key. Optional:
`get_shared()`, runs trained once, in order, into `<workdir>/shared/` before the sweep (a fixed VQ
and base every run starts from; `{shared}` in a string value names that directory), `HELDOUT`
(`split`, `num_examples`, `batch_size` of the held-out loss every run ends with) and a `name` key
in an entry (its run name instead of the one derived from its overrides).

Every override key is checked against its config before anything runs; a run's name is a pure
function of its overrides, so a restarted sweep finds its runs again. The manifest
(`<workdir>/manifest.jsonl`) gets one line per event (`started`, `finished`, `diverged`); a rerun
skips runs whose last event is `finished` or `diverged` and resumes the one that was interrupted
(the trainer resumes it from its newest checkpoint).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import threading
import time
from collections.abc import Callable

import jax
import ml_collections
from flax import nnx

from star_jax import checkpointing, heldout, optim, sharding, stages, train
from star_jax.configs import validation

MANIFEST = "manifest.jsonl"
SHARED = "shared"
DEFAULT_HELDOUT = {"split": "validation", "num_examples": 512, "batch_size": 64}
NOT_CONFIG_KEYS = ("config_arg", "name")
MAX_NAME = 96


class SweepError(ValueError):
    """A bad sweep file or override; the message is one line naming the file, run and key."""


@dataclasses.dataclass
class Run:
    """One point of a sweep: its name, the overrides it came from and its resolved config."""

    name: str
    overrides: dict
    config: ml_collections.ConfigDict
    shared: bool = False


# -- expanding a sweep file --------------------------------------------------------------------------


def load_module(path: str):
    """The sweep file at `path` as a module; SweepError when it does not exist or lacks get_sweep()."""
    if not os.path.isfile(path):
        raise SweepError(f"--sweep {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file is reported in one line
        raise SweepError(f"--sweep {path!r} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"--sweep {path!r} defines no get_sweep() (a function returning a list of override dicts)")
    return module


def _config_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _config_keys(value, prefix + key + ".")
    return keys


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, where: str) -> ml_collections.ConfigDict:
    """Sets every dotted key of `overrides` (but `config_arg` / `name`) on `config`, in place.

    A key the config does not have, or a value of the wrong type, raises SweepError naming `where`
    (e.g. "run 3 of configs/sweeps/x.py"), the key and the closest existing key.
    """
    for key, value in overrides.items():
        if key in NOT_CONFIG_KEYS:
            continue
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if node is None:
                break
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            close = difflib.get_close_matches(key, _config_keys(config), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"{where}: override {key}={value!r}: the config has no key {key!r}{hint}")
        try:
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            raise SweepError(f"{where}: override {key}={value!r}: {e}") from None
    return config


def _short(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _digest(overrides: dict) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]


def run_name(overrides: dict, keys: list[str] | None = None) -> str:
    """A stable directory name for `overrides`: the `name` entry when given, else `leaf=value`
    pairs of `keys` (default: every override; `expand` passes the keys whose values differ
    between the sweep's runs) in sorted order, then `~` and a hash of all the overrides, e.g.
    `stack_layers=4,num_steps=351~3f2a1c`. The hash makes a changed run a new run: a rerun of an
    edited sweep never mistakes it for one that finished. Longer than MAX_NAME: the start is kept."""
    if "name" in overrides:
        return _short(overrides["name"])
    keys = sorted(k for k in overrides if k != "name") if keys is None else sorted(keys)
    parts = []
    for key in keys:
        if key not in overrides:
            continue
        if key == "config_arg":
            parts += [_short(item) for item in str(overrides[key]).split(",") if item]
        else:
            parts.append(f"{key.split('.')[-1]}={_short(overrides[key])}")
    name = re.sub(r"[^A-Za-z0-9.,=+-]+", "-", ",".join(parts))[: MAX_NAME - 7].rstrip(",")
    return f"{name}~{_digest(overrides)}" if name else _digest(overrides)


def varying_keys(entries: list[dict]) -> list[str]:
    """The override keys whose values differ between `entries` (or that some entries lack)."""
    keys = {k for e in entries for k in e if k != "name"}
    return [k for k in keys if len({json.dumps(e.get(k, "<unset>"), sort_keys=True, default=str) for e in entries}) > 1]


def _substitute(value, shared_dir: str):
    if isinstance(value, str):
        return value.replace("{shared}", shared_dir)
    if isinstance(value, (tuple, list)):
        return type(value)(_substitute(v, shared_dir) for v in value)
    return value


def _config_module(module):
    name = getattr(module, "CONFIG", "star_jax.configs.star")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SweepError(f"sweep CONFIG={name!r} cannot be imported: {e}") from None


def expand(path: str, workdir: str) -> tuple[list[Run], list[Run], dict]:
    """(shared runs, sweep runs, held-out settings) of the sweep file `path` for `workdir`.

    Every run's config is built and its overrides checked (`apply_overrides`) and validated
    (`configs.validation`) here, before anything runs. Raises SweepError with one line: a file
    without get_sweep(), an entry that is not a dict, an unknown key, an invalid config, or two
    runs with the same name.
    """
    module = load_module(path)
    config_module = _config_module(module)
    shared_dir = os.path.abspath(os.path.join(workdir, SHARED))
    out: dict[bool, list[Run]] = {True: [], False: []}
    entries = [(True, e) for e in (module.get_shared() if hasattr(module, "get_shared") else [])]
    entries += [(False, e) for e in module.get_sweep()]
    seen: dict[str, str] = {}
    keys = varying_keys([e for shared, e in entries if not shared and isinstance(e, dict)])
    for i, (shared, entry) in enumerate(entries):
        where = f"{'shared run' if shared else 'run'} {i} of {path}"
        if not isinstance(entry, dict):
            raise SweepError(f"{where}: expected a dict of overrides, got {type(entry).__name__}")
        entry = {k: _substitute(v, shared_dir) for k, v in entry.items()}
        try:
            config = config_module.get_config(entry.get("config_arg"))
        except ValueError as e:
            raise SweepError(f"{where}: config_arg={entry.get('config_arg')!r}: {e}") from None
        apply_overrides(config, entry, where)
        try:
            stages.import_projects(config)
            validation.validate(config, num_devices=jax.device_count())
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
        name = run_name(entry, keys) if not shared else f"{config.stage}"
        key = (SHARED + "/" if shared else "") + name
        if key in seen:
            raise SweepError(
                f"{where}: two runs have the same name {name!r} ({seen[key]} too): give one a 'name' or other overrides"
            )
        seen[key] = where
        out[shared].append(Run(name, entry, config, shared))
    return out[True], out[False], {**DEFAULT_HELDOUT, **getattr(module, "HELDOUT", {})}


# -- what a run costs ---------------------------------------------------------------------------------


EMBEDDING_PARAMS = re.compile(r"(^|/)(embedding|lm_head|image_head)(/|$)")


def param_counts(config) -> dict[str, int]:
    """{"trainable_params", "frozen_params", "non_embedding_params"} of `config.stage` (see
    `_param_counts`), cached by model config and trainable regexes."""
    key = json.dumps([config.stage, config.model.to_dict(), list(config.train.trainable)], sort_keys=True, default=str)
    if key not in _PARAM_COUNTS:
        _PARAM_COUNTS[key] = _param_counts(config)
    return dict(_PARAM_COUNTS[key])


_PARAM_COUNTS: dict[str, dict] = {}


def _param_counts(config) -> dict[str, int]:
    """{"trainable_params", "frozen_params", "non_embedding_params"} of `config.stage` from abstract
    shapes (nothing allocated); non-embedding = trainable params outside the token embedding, the LM
    head and the image head (Kaplan's N: the output layers scale with the vocabulary, not depth)."""
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.rules_from_config(config)):
        abstract = nnx.eval_shape(lambda: stages.build_model(config, rngs=nnx.Rngs(config.seed)))
    _, trainable, frozen, _ = optim.split_trainable(abstract, list(config.train.trainable))
    flat = checkpointing.flatten(trainable.to_pure_dict())
    n_trainable = sum(int(x.size) for x in flat.values())
    embedding = sum(int(x.size) for path, x in flat.items() if EMBEDDING_PARAMS.search(path))
    return {
        "trainable_params": n_trainable,
        "frozen_params": sum(int(x.size) for x in jax.tree.leaves(frozen.to_pure_dict())),
        "non_embedding_params": n_trainable - embedding,
    }


def target_tokens_per_example(config) -> int:
    """Tokens with a loss in one example (Chinchilla's D per example): the image tokens of an
    image-token stage, the prompt length (an upper bound) of a text stage, else 1 (an image)."""
    stage = stages.for_config(config)
    if stage.image_tokens:
        return stages.num_image_tokens(config)
    return config.data.max_prompt_len if stage.reads == "qa" else 1


def accounting(config) -> dict:
    """FLOPs, parameters and tokens of one run of `config` (analytic, nothing allocated):
    flops (training: the stage's FLOPs per example x batch x steps), `param_counts`, tokens (every
    token the step processes), target_tokens (tokens with a loss: Chinchilla's D) and examples."""
    stage = stages.for_config(config)
    examples = config.train.batch_size * config.train.num_steps
    return {
        "flops": float(stage.flops_per_example(config)) * examples,
        **param_counts(config),
        "tokens": int(stage.tokens_per_example(config)) * examples,
        "target_tokens": target_tokens_per_example(config) * examples,
        "examples": examples,
    }


# -- the manifest ------------------------------------------------------------------------------------


class Manifest:
    """Append-only JSONL of run events under the sweep's workdir; the last event of a run wins."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, MANIFEST)

    def records(self) -> list[dict]:
        """Every event, oldest first (a torn last line, from a kill mid-write, is ignored)."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def latest(self) -> dict[str, dict]:
        """{run key: its last event}."""
        return {r["run"]: r for r in self.records()}

    def append(self, record: dict) -> None:
        """Appends one event (flushed and fsynced: a kill never loses a finished run)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def run_key(run: Run) -> str:
    """The run's key in the manifest and its directory under the workdir."""
    return f"{SHARED}/{run.name}" if run.shared else run.name


def run_dir(workdir: str, run: Run) -> str:
    """Where `run` trains: `<workdir>/shared` for shared runs (one workdir, stage after stage)."""
    return os.path.join(workdir, SHARED) if run.shared else os.path.join(workdir, run.name)


# -- running -----------------------------------------------------------------------------------------


class Progress:
    """A background thread printing `runs done/total | run step/steps | ETA` every `every` seconds,
    read from the running stage's metrics.jsonl (the trainer's own log)."""

    def __init__(self, total_flops: float, num_runs: int, every: float = 30.0, out: Callable = print):
        self.total_flops, self.num_runs, self.every, self.out = total_flops, num_runs, every, out
        self.done_flops, self.done_runs = 0.0, 0
        self.current: tuple[Run, str, float] | None = None
        self.t0 = time.time()
        self.flops_timed, self.seconds_timed = 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _loop(self):
        while not self._stop.wait(self.every):
            self.out(self.line())

    def line(self) -> str:
        """The progress line now."""
        parts = [f"[sweep] runs {self.done_runs}/{self.num_runs}"]
        remaining = self.total_flops - self.done_flops
        if self.current is not None:
            run, directory, started = self.current
            step, total = _last_step(directory, run.config.stage), run.config.train.num_steps
            parts.append(f"{run.name} step {step}/{total}")
            remaining -= run_flops(run) * step / max(total, 1)
        rate = self.flops_timed / self.seconds_timed if self.seconds_timed else None
        if rate:
            parts.append(f"ETA {_duration(remaining / rate)}")
        return " | ".join(parts)

    def finished(self, flops: float, seconds: float) -> None:
        """Counts one run of `flops` that took `seconds` (compile included); runs without a FLOP
        count (a VQ stage) do not enter the rate."""
        self.done_runs += 1
        self.done_flops += flops
        if flops > 0:
            self.flops_timed += flops
            self.seconds_timed += seconds


def _last_step(directory: str, stage: str) -> int:
    path = os.path.join(directory, stage, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def run_flops(run: Run) -> float:
    """Training FLOPs of `run` (analytic)."""
    return float(stages.for_config(run.config).flops_per_example(run.config)) * (
        run.config.train.batch_size * run.config.train.num_steps
    )


def execute(
    runs: list[Run],
    workdir: str,
    heldout_cfg: dict,
    *,
    train_fn: Callable = train.train_and_evaluate,
    evaluate: Callable = heldout.heldout_loss,
    out: Callable = print,
) -> dict[str, dict]:
    """Trains every run not finished yet (in order: shared runs first) with `train_fn(config,
    directory)`, evaluates each sweep run with `evaluate(directory, stage, **heldout_cfg)` and
    records it in the manifest; `out` gets the console lines. Returns {run key: last event}.

    A run that raises `train.NonFiniteError`, or whose held-out loss is not finite, is recorded
    as `diverged` (with the message) and the sweep goes on. A run the trainer left without its DONE
    marker (SIGTERM) stops the sweep: a rerun resumes it.
    """
    manifest = Manifest(workdir)
    latest = manifest.latest()
    todo = [r for r in runs if latest.get(run_key(r), {}).get("status") not in ("finished", "diverged")]
    out(f"[sweep] {len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run")
    progress = Progress(sum(run_flops(r) for r in todo), len(runs), out=out)
    progress.done_runs = len(runs) - len(todo)
    with progress:
        for run in todo:
            directory = run_dir(workdir, run)
            key = run_key(run)
            resumed = checkpointing.has_checkpoint(directory, run.config.stage)
            acct = accounting(run.config)
            manifest.append(
                {"run": key, "status": "started", "resumed": resumed, "time": time.time(), "overrides": run.overrides}
                | acct
            )
            out(f"[sweep] {'resuming' if resumed else 'starting'} {key}: {acct['flops']:.3g} FLOPs")
            progress.current = (run, directory, time.time())
            t0 = time.time()
            record = {"run": key, "overrides": run.overrides, "shared": run.shared, "stage": run.config.stage} | acct
            try:
                last = train_fn(run.config, directory)
            except train.NonFiniteError as e:
                manifest.append(record | {"status": "diverged", "note": str(e), "time": time.time()})
                out(f"[sweep] {key} diverged: {e}")
                progress.current = None
                progress.finished(acct["flops"], time.time() - t0)
                continue
            progress.current = None
            if not checkpointing.is_stage_done(directory, run.config.stage):
                out(f"[sweep] {key} stopped before its last step; rerun the same command to resume it")
                return manifest.latest()
            record |= {"train_loss": last.get("loss"), "wall_time_s": time.time() - t0}
            if not run.shared:
                result = evaluate(directory, run.config.stage, **heldout_cfg)
                record |= {"heldout_" + k: v for k, v in result.items()}
                if not result["finite"]:
                    manifest.append(record | {"status": "diverged", "note": "held-out loss is not finite"})
                    out(f"[sweep] {key} diverged: held-out loss {result['loss']}")
                    progress.finished(acct["flops"], time.time() - t0)
                    continue
            manifest.append(record | {"status": "finished", "time": time.time()})
            progress.finished(acct["flops"], time.time() - t0)
            loss = record.get("heldout_loss")
            out(f"[sweep] finished {key}" + (f": held-out loss {loss:.4f}" if loss is not None else ""))
            out(progress.line())
    return manifest.latest()
