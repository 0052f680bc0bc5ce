"""Reading a star_jax stage directory tensor by tensor, for export and verification.

`StageReader` reads one star_jax tensor at a time from a stage directory (`frozen/` plus the newest
`ckpt/<step>/state` params and non-param variables) with Orbax partial restores straight into
numpy, so the whole model never has to be in one host's memory: the peak is about the largest
single (stacked) tensor. `abstract_star` gives the stage's model with shapes only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from star_jax import sharding, stages
from star_jax.convert.table import CheckpointError
from star_jax.models import star


def stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
    """The config a stage was trained (or imported) with: `workdir/<stage>/config.json`."""
    path = os.path.join(workdir, stage, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; is {os.path.join(workdir, stage)} a star_jax stage directory?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def build_star(config, stage: str | None = None, *, rngs: nnx.Rngs) -> star.Star:
    """The STAR model with the parts of `stage` (default `config.stage`; a project's stage once
    `config.imports` are imported), from the stage registry."""
    stages.import_projects(config)
    return stages.build_model(config, stage or config.stage, rngs=rngs)


def abstract_star(config, stage: str | None = None) -> star.Star:
    """The stage's STAR model with ShapeDtypeStruct params (nothing allocated), on one device."""
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, stage, rngs=nnx.Rngs(0)), mesh)
    return nnx.merge(graphdef, state)


def _leaves(tree, prefix=()) -> Iterator[tuple[tuple, object]]:
    tree = tree.tree if hasattr(tree, "tree") else tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


class StageReader:
    """One stage's saved tensors, read one at a time as numpy arrays (frozen and newest step).

    `metadata`: star_jax path ('/'-joined) -> (shape, dtype). `read(path)` -> np.ndarray.
    """

    def __init__(self, workdir: str, stage: str, step: int | None = None):
        self.dir = os.path.abspath(os.path.join(workdir, stage))
        ckpt_dir = os.path.join(self.dir, "ckpt")
        steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(ckpt_dir) else []
        if step is None and not steps:
            raise CheckpointError(f"{self.dir}: no checkpoint steps under ckpt/")
        self.step = steps[-1] if step is None else step
        if self.step not in steps:
            raise CheckpointError(f"{self.dir}: no step {self.step} (saved: {steps})")
        self._ckptr = ocp.PyTreeCheckpointer()
        self.metadata: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._where: dict[str, tuple[str, tuple]] = {}  # path -> (directory, key path in that tree)
        frozen = os.path.join(self.dir, "frozen")
        sources = [(frozen, "")] if os.path.isdir(frozen) else []
        sources.append((os.path.join(ckpt_dir, str(self.step), "state"), "state"))
        for directory, kind in sources:
            for keys, meta in _leaves(self._ckptr.metadata(directory).item_metadata):
                names = [str(k) for k in keys]
                if kind == "state":  # params/... and other/... map to model paths; opt_state is skipped
                    if names[0] not in ("params", "other"):
                        continue
                    names = names[1:]
                path = "/".join(names)
                self.metadata[path] = (tuple(meta.shape), np.dtype(meta.dtype))
                self._where[path] = (directory, keys)

    def read(self, path: str) -> np.ndarray:
        """The saved tensor at star_jax `path` (its stored dtype), restored alone into host memory."""
        return self.read_many([path])[path]

    def read_many(self, paths: list[str]) -> dict[str, np.ndarray]:
        """Several saved tensors in one Orbax partial restore per directory: path -> np.ndarray."""
        unknown = [p for p in paths if p not in self._where]
        if unknown:
            raise CheckpointError(f"{self.dir}: tensors {unknown[:10]} are not in the checkpoint (step {self.step})")
        out = {}
        for directory in {self._where[p][0] for p in paths}:
            group = [p for p in paths if self._where[p][0] == directory]
            item, args = {}, {}
            for p in group:
                *parents, leaf = self._where[p][1]
                node_i, node_a = item, args
                for k in parents:
                    node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
                node_i[leaf], node_a[leaf] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
            restored = self._ckptr.restore(
                directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
            )
            for p in group:
                value = restored
                for k in self._where[p][1]:
                    value = value[k]
                out[p] = np.asarray(value)
        return out

    def close(self) -> None:
        self._ckptr.close()


def restore_stage_params(workdir: str, stage: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Every saved tensor of a stage (params and non-param variables) as flat path -> numpy array."""
    reader = StageReader(workdir, stage, step)
    try:
        return reader.read_many(list(reader.metadata))
    finally:
        reader.close()
