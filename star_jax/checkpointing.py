"""Orbax checkpoints, one manager per stage under `workdir/<stage>/`.

Layout of a stage directory:
  config.json         the run's config, written once the stage's first checkpoint is complete
                      (`write_config_after_save`): a directory without it is not a stage yet
  frozen/             frozen params, written once when the stage starts (not at every save)
  ckpt/<step>/        trainable params, optimizer state, other model variables, RNG + step
                      (`state`), and the Grain iterator state (`data`); async, keep-last-k and
                      keep-every-m; Orbax finalises a step by an atomic rename, so a kill during
                      a save leaves the previous step as the newest readable one
  DONE                the stage reached its last step (written after the final save finished)

Restores are always to a target built from the *current* model and mesh, so a checkpoint saved
on one mesh restores onto any other.

Paths go through `etils.epath`, so a `gs://` workdir works wherever its filesystem does; local paths
as before. In a multi-process run only process 0 writes config.json and DONE and removes what a
failed start left (`distributed.is_writer`); every process takes part in the Orbax saves (each
writes its own shards and its own Grain iterator state).

Nothing half-written counts: a stage counts once a step under `ckpt/` is complete (Orbax renames
it into place) and `config.json` exists; `has_checkpoint` / `discard_incomplete` let a writer
remove what a failed start left (frozen params, an empty `ckpt/`), so a rerun starts clean.
Orbax's warnings on every read-only open ("Given directory is read only", "Metadata file does not
exist") are filtered from the absl logger; its errors are kept.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from star_jax import distributed

PyTree = dict

# Orbax warnings that every read-only restore prints and that mean nothing to a user.
_READ_NOISE = ("Given directory is read only", "Metadata file does not exist")


class ResumeError(ValueError):
    """A checkpoint that this run cannot resume (one line naming why)."""


class _QuietReads(logging.Filter):
    """Drops Orbax's read-only / missing-metadata warnings (below ERROR); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not str(record.msg).startswith(_READ_NOISE)


def quiet_orbax_reads() -> None:
    """Installs the filter of Orbax's read-only warnings on the absl logger (idempotent)."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietReads) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietReads())


quiet_orbax_reads()


def flatten(tree: PyTree, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, object]) -> PyTree:
    """{'a/b/c': leaf} -> nested dict."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def assign_flat(tree: PyTree, flat: dict[str, object]) -> PyTree:
    """Copy of nested `tree` with the leaves named in `flat` ('a/0/b' -> leaf) replaced. Keys are
    matched by their string form, so nnx list indices (ints) match the string paths Orbax stores."""
    if not flat:
        return tree
    out = {}
    for k, v in tree.items():
        key = str(k)
        if isinstance(v, dict):
            sub = {p[len(key) + 1 :]: x for p, x in flat.items() if p.startswith(key + "/")}
            out[k] = assign_flat(v, sub)
        else:
            out[k] = flat.get(key, v)
    return out


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, as Orbax restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class StageCheckpoints:
    """Checkpoints of one training stage."""

    def __init__(
        self,
        workdir: str,
        stage: str,
        *,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """read_only: for readers (inference, evaluation, a later stage): creates and deletes
        nothing. A writable manager deletes unfinished saves when it opens, which would remove
        the files of a save in flight in another process (a run still training)."""
        self.dir = str(stage_path(workdir, stage))
        if not read_only:
            epath.Path(self.dir).mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last,  # what Orbax forces (with a warning) when read-only
            save_interval_steps=0 if read_only else 1,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(epath.Path(self.dir) / "ckpt", options=options)
        self._pending_config = None

    # -- config and completion markers ---------------------------------------------------------
    def write_config(self, config) -> None:
        """Writes `config` as the stage's config.json now (atomically; process 0 only)."""
        if distributed.is_writer():
            _atomic_write(epath.Path(self.dir) / "config.json", config.to_json(indent=2))

    def write_config_after_save(self, config) -> None:
        """Writes `config` as config.json right after the next `save` has completed (that save then
        waits for its files), so the directory counts as a stage only once a checkpoint is complete."""
        self._pending_config = config

    def mark_done(self, step: int) -> None:
        """Writes the DONE marker (`{"step": step}`; process 0 only): the stage reached its last step."""
        if distributed.is_writer():
            _atomic_write(epath.Path(self.dir) / "DONE", json.dumps({"step": step}))

    def is_done(self) -> bool:
        """Whether the stage's DONE marker exists."""
        return (epath.Path(self.dir) / "DONE").exists()

    # -- frozen params, once per stage ----------------------------------------------------------
    @property
    def frozen_dir(self) -> str:
        """`<stage>/frozen`, where the frozen params are saved once."""
        return str(epath.Path(self.dir) / "frozen")

    def has_frozen(self) -> bool:
        """Whether a finished save of the frozen params exists."""
        frozen = epath.Path(self.frozen_dir)
        return (frozen / "_CHECKPOINT_METADATA").exists() or (frozen / "_METADATA").exists()

    def save_frozen(self, frozen: PyTree) -> None:
        """Writes the frozen params once (synchronously; Orbax renames a temp dir into place; every
        process takes part)."""
        if self.has_frozen() or not jax.tree.leaves(frozen):
            return
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(epath.Path(self.frozen_dir), frozen, force=True)
            ckptr.wait_until_finished()

    def restore_frozen(self, target: PyTree) -> PyTree:
        """The frozen params restored onto `target`'s shapes, dtypes and shardings."""
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(epath.Path(self.frozen_dir), abstract_like(target))

    # -- training state ---------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finished step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_iter=None, *, force: bool = False) -> bool:
        """Queues an async save of `state` (+ the data iterator's state) at `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved and self._pending_config is not None:
            self.manager.wait_until_finished()
            self.write_config(self._pending_config)
            self._pending_config = None
        return saved

    def restore(self, step: int, target: PyTree, data_iter=None) -> PyTree:
        """Restores the state at `step` onto `target`'s shapes and shardings; the data iterator in
        place. A step saved without an iterator (an imported stage) leaves the iterator at its start.
        An iterator state written by another number of processes raises ResumeError (one line):
        each process's position in its shard of the records has no counterpart in another split."""
        items = {"state": ocp.args.StandardRestore(abstract_like(target))}
        data_dir = epath.Path(self.manager.directory) / str(step) / "data"
        if data_iter is not None and data_dir.is_dir():
            own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not (data_dir / own).exists():
                written = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".json"))
                counts = sorted({name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in written})
                raise ResumeError(
                    f"{data_dir.parent} was written by {' / '.join(counts) or 'an unknown number of'} processes and "
                    f"this run has {jax.process_count()}: resume with the same number of processes "
                    "(JAX_NUM_PROCESSES / the slice) as the run that saved it"
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def read_state(self, step: int) -> PyTree:
        """The saved training state at `step` as host numpy arrays, whatever devices or processes wrote
        it (no target: for inspection and tools)."""
        path = epath.Path(self.manager.directory) / str(step) / "state"
        with ocp.PyTreeCheckpointer() as ckptr:
            saved = ckptr.metadata(path).item_metadata
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))

    def restore_params(self, step: int, targets: dict[str, object]) -> dict[str, object]:
        """Restores only the saved params whose flat paths are in `targets` (flat path -> array
        with the wanted sharding), reading nothing else. Used to start a stage from another's."""
        path = str(epath.Path(self.manager.directory) / str(step) / "state")
        return _restore_subset(path, targets, prefix="params/")

    def restore_frozen_params(self, targets: dict[str, object]) -> dict[str, object]:
        """Like `restore_params`, from the stage's frozen directory."""
        return _restore_subset(self.frozen_dir, targets, prefix="") if self.has_frozen() else {}

    def wait(self) -> None:
        """Blocks until queued async saves are finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for queued saves, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def is_stage_done(workdir: str, stage: str) -> bool:
    """Whether `stage` under `workdir` reached its last step (its DONE marker exists)."""
    return (stage_path(workdir, stage) / "DONE").exists()


def stage_path(workdir: str, stage: str) -> epath.Path:
    """`workdir/<stage>` as an epath.Path: absolute for a local path, as given for a URL (gs://...)."""
    root = str(workdir)
    return epath.Path(root if "://" in root else os.path.abspath(root)) / stage


def complete_steps(stage_dir: str) -> list[int]:
    """The steps under `stage_dir/ckpt/` that Orbax finished (renamed into place), ascending; reads
    only the directory listing (an unfinished save is a temporary directory with another name)."""
    ckpt_dir = epath.Path(stage_dir) / "ckpt"
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def has_checkpoint(workdir: str, stage: str) -> bool:
    """Whether `workdir/<stage>` holds a complete checkpoint step (so it counts as a stage)."""
    return bool(complete_steps(str(stage_path(workdir, stage))))


def discard_incomplete(workdir: str, stage: str) -> bool:
    """Removes `workdir/<stage>` when it holds no complete checkpoint step: what a failed start left
    (config.json, frozen/, an empty ckpt/, logs). A stage with a complete step is never touched.
    Returns whether something was (or, on a process other than 0, is being) removed: process 0
    removes, every process returns the same answer."""
    stage_dir = stage_path(workdir, stage)
    if not stage_dir.is_dir() or has_checkpoint(workdir, stage):
        return False
    if distributed.is_writer():
        stage_dir.rmtree()
    return True


def _restore_subset(path: str, targets: dict[str, object], prefix: str) -> dict[str, object]:
    """Partial restore of the arrays under `path` whose flat path (minus `prefix`) is in `targets`,
    each onto its target's sharding. Returns flat path (without prefix) -> array."""
    with ocp.PyTreeCheckpointer() as ckptr:
        saved = flatten(_to_dict(ckptr.metadata(path).item_metadata))
        wanted = {k[len(prefix) :]: m for k, m in saved.items() if k.startswith(prefix) and k[len(prefix) :] in targets}
        if not wanted:
            return {}
        target = {
            prefix + k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=targets[k].sharding)
            for k, m in wanted.items()
        }
        for k in wanted:
            if tuple(wanted[k].shape) != tuple(targets[k].shape):
                raise ValueError(
                    f"{path}: {k} has shape {tuple(wanted[k].shape)}, the model wants {tuple(targets[k].shape)}"
                )
        target = unflatten(target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = ckptr.restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    flat = flatten(restored)
    return {k[len(prefix) :]: v for k, v in flat.items()}


def _to_dict(tree) -> dict:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _atomic_write(path: epath.Path, text: str) -> None:
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)
