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
import shutil

import grain
import jax
import orbax.checkpoint as ocp

PyTree = dict

# Orbax warnings that every read-only restore prints and that mean nothing to a user.
_READ_NOISE = ("Given directory is read only", "Metadata file does not exist")


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
        self.dir = os.path.abspath(os.path.join(workdir, stage))
        if not read_only:
            os.makedirs(self.dir, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last,  # what Orbax forces (with a warning) when read-only
            save_interval_steps=0 if read_only else 1,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(os.path.join(self.dir, "ckpt"), options=options)
        self._pending_config = None

    # -- config and completion markers ---------------------------------------------------------
    def write_config(self, config) -> None:
        """Writes `config` as the stage's config.json now (atomically)."""
        _atomic_write(os.path.join(self.dir, "config.json"), config.to_json(indent=2))

    def write_config_after_save(self, config) -> None:
        """Writes `config` as config.json right after the next `save` has completed (that save then
        waits for its files), so the directory counts as a stage only once a checkpoint is complete."""
        self._pending_config = config

    def mark_done(self, step: int) -> None:
        """Writes the DONE marker (`{"step": step}`): the stage reached its last step."""
        _atomic_write(os.path.join(self.dir, "DONE"), json.dumps({"step": step}))

    def is_done(self) -> bool:
        """Whether the stage's DONE marker exists."""
        return os.path.exists(os.path.join(self.dir, "DONE"))

    # -- frozen params, once per stage ----------------------------------------------------------
    @property
    def frozen_dir(self) -> str:
        """`<stage>/frozen`, where the frozen params are saved once."""
        return os.path.join(self.dir, "frozen")

    def has_frozen(self) -> bool:
        """Whether a finished save of the frozen params exists."""
        return os.path.exists(os.path.join(self.frozen_dir, "_CHECKPOINT_METADATA")) or os.path.exists(
            os.path.join(self.frozen_dir, "_METADATA")
        )

    def save_frozen(self, frozen: PyTree) -> None:
        """Writes the frozen params once (synchronously; Orbax renames a temp dir into place)."""
        if self.has_frozen() or not jax.tree.leaves(frozen):
            return
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.frozen_dir, frozen, force=True)
            ckptr.wait_until_finished()

    def restore_frozen(self, target: PyTree) -> PyTree:
        """The frozen params restored onto `target`'s shapes, dtypes and shardings."""
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self.frozen_dir, abstract_like(target))

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
        place. A step saved without an iterator (an imported stage) leaves the iterator at its start."""
        items = {"state": ocp.args.StandardRestore(abstract_like(target))}
        has_data = os.path.isdir(os.path.join(str(self.manager.directory), str(step), "data"))
        if data_iter is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def read_state(self, step: int) -> PyTree:
        """The saved training state at `step` as written (no target: for inspection and tools)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def restore_params(self, step: int, targets: dict[str, object]) -> dict[str, object]:
        """Restores only the saved params whose flat paths are in `targets` (flat path -> array
        with the wanted sharding), reading nothing else. Used to start a stage from another's."""
        path = os.path.join(str(self.manager.directory), str(step), "state")
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
    return os.path.exists(os.path.join(workdir, stage, "DONE"))


def complete_steps(stage_dir: str) -> list[int]:
    """The steps under `stage_dir/ckpt/` that Orbax finished (renamed into place), ascending; reads
    only the directory listing (an unfinished save is a temporary directory with another name)."""
    ckpt_dir = os.path.join(stage_dir, "ckpt")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit() and os.path.isdir(os.path.join(ckpt_dir, s)))


def has_checkpoint(workdir: str, stage: str) -> bool:
    """Whether `workdir/<stage>` holds a complete checkpoint step (so it counts as a stage)."""
    return bool(complete_steps(os.path.join(workdir, stage)))


def discard_incomplete(workdir: str, stage: str) -> bool:
    """Removes `workdir/<stage>` when it holds no complete checkpoint step: what a failed start left
    (config.json, frozen/, an empty ckpt/, logs). A stage with a complete step is never touched.
    Returns whether something was removed."""
    stage_dir = os.path.join(workdir, stage)
    if not os.path.isdir(stage_dir) or has_checkpoint(workdir, stage):
        return False
    shutil.rmtree(stage_dir)
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


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
