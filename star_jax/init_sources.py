"""Where a stage's params start from, and loading a trained workdir.

`config.train.init_from` lists sources applied in order (later ones win for the params they hold):
  "<stage>"        the final params of an earlier stage under the same workdir
  "stage:<dir>"    the final params of the stage saved in <dir> (`<other workdir>/<stage>`)
  "hf:<dir>"       a Hugging Face Qwen2.5-VL / Qwen2 directory -> `base/` and, when the model has a
                   ViT and the directory a `vision_config`, `vision/`; its config.json must agree
                   with the model's decoder / vision configs (one ValueError names every field)
  "vq:<file>"      VQ weights in the reference layout (.safetensors, or a .pt state dict read with
                   torch.load(weights_only=True); standalone or `pixel_encoder.` names) -> `vq/`
  "star:<file>"    the reference STAR state dict (.safetensors / .pt) -> every part the model has
After loading, a model with a stacked AR that no source loaded copies it from the base's last N
layers (`config.model.star.stack_init = "copy_last"`).

Every source writes straight into the target params' shardings, tensor by tensor: the model is
already built sharded; a reference tensor is read, transformed on the host (numpy), and each device
receives only its own slice (`convert.table.place`); Orbax restores onto the targets' shardings.
No device ever holds more than its shard, and no whole model is built on one device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import ml_collections
from flax import nnx

from star_jax import checkpointing, sharding
from star_jax.convert import decoder_table, hf, hf_config, star_table, tensor_io, vision_table, vq_table
from star_jax.convert.stage_reader import build_star
from star_jax.convert.table import CheckpointError, Entry, load_params
from star_jax.models import star

SOURCE_KINDS = ("stage", "hf", "vq", "star")


class WorkdirError(ValueError):
    """A workdir that holds no usable STAR checkpoint."""


def param_targets(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat '/'-joined path -> current param array (its shape, dtype and sharding are load targets)."""
    return checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict())


def _assign(model: nnx.Module, loaded: Mapping[str, jax.Array]) -> set[str]:
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(checkpointing.assign_flat(state.to_pure_dict(), dict(loaded)))
    nnx.update(model, state)
    return set(loaded)


# -- sources ----------------------------------------------------------------------------------------


def load_from_stage(model: nnx.Module, workdir: str, stage: str) -> set[str]:
    """Loads every param of `model` that stage `stage` saved (frozen + newest trainable), restored by
    Orbax onto each param's sharding. Returns the flat paths loaded. Raises if the stage has no checkpoint."""
    ckpts = checkpointing.StageCheckpoints(workdir, stage, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"stage {stage!r} has no checkpoint under {ckpts.dir}; run it first")
        if not ckpts.is_done():
            logging.warning("stage %s did not finish (no DONE marker); using its step %d", stage, step)
        targets = param_targets(model)
        loaded = ckpts.restore_frozen_params(targets)
        loaded.update(ckpts.restore_params(step, targets))
    finally:
        ckpts.close()
    return _assign(model, loaded)


def _load_tensors(model, entries: Iterable[Entry], tensors: Mapping, *, source: str, ignore=()) -> set[str]:
    """The params among `entries` from reference `tensors`, placed into the model's shardings.
    Entries that are not params (the VQ usage buffer) are skipped, and so are their tensors."""
    targets = param_targets(model)
    entries = list(entries)
    kept = [e for e in entries if e.flax in targets]
    ignore = tuple(ignore) + tuple(e.ref.split("{i}")[0] for e in entries if e.flax not in targets)
    values = load_params({e.flax: targets[e.flax] for e in kept}, kept, tensors, source=source, ignore_prefixes=ignore)
    return _assign(model, values)


def load_hf(model: star.Star, path: str) -> set[str]:
    """`hf:<dir>`: the base (text decoder) and, when the model has a ViT and the directory a
    `vision_config`, the vision tower; raises CheckpointError (a ValueError) naming every config.json
    field that disagrees with the model's configs, or every missing / unexpected / mis-shaped tensor."""
    comps, hf_json = model.components, hf_config.read_config(path)
    with_base = "base" in comps
    with_vision = "vision" in comps and bool(hf_json.get("vision_config"))
    if "vision" in comps and not with_vision:
        logging.warning("hf:%s has no vision_config: loading the text decoder only", path)
    if not (with_base or with_vision):
        raise ValueError(f"init source hf:{path}: the model ({', '.join(comps)}) has no base or vision tower")
    hf_config.check_hf_config(path, model.decoder_cfg if with_base else None, model.vision_cfg if with_vision else None)
    entries, ignore = [], []
    if with_base:
        entries += decoder_table.decoder_entries(model.decoder_cfg.tie_embeddings, "base/")
        ignore += ["lm_head."] if model.decoder_cfg.tie_embeddings else []  # a tied checkpoint may carry a copy
    else:
        ignore += ["model.", "lm_head."]
    if with_vision:
        entries += vision_table.vision_entries(model.vision_cfg, "vision/", "visual.")
    else:
        ignore += ["visual."]
    return _load_tensors(model, entries, hf.read_directory(path), source=f"hf:{path}", ignore=ignore)


def load_vq(model: star.Star, path: str) -> set[str]:
    """`vq:<file>`: the `vq/` params from reference VQ weights (standalone `encoder.*` / `quantize.*`
    or STAR `pixel_encoder.*` names); the usage buffer `quantize.codebook_used` (int64 in the
    reference) is not a param and is skipped."""
    if "vq" not in model.components:
        raise ValueError(f"init source vq:{path}: the model ({', '.join(model.components)}) has no VQ")
    tensors = tensor_io.read_tensors(path)
    try:
        prefix = vq_table.detect_prefix(tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    entries = vq_table.entries(vq_table.state_paths(nnx.state(model.vq, nnx.Param)), flax_prefix="vq/")
    view = vq_table.SubView(tensors, prefix)
    return _load_tensors(model, entries, view, source=f"vq:{path}", ignore=(vq_table.USAGE_NAME,))


def load_star_file(model: star.Star, path: str) -> set[str]:
    """`star:<file>`: every param the model has from the reference STAR state dict (`.safetensors`, or a
    `.pt` holding `{'state_dict': ...}` read with weights_only); parts the model lacks are ignored."""
    ignore = star_table.unused_prefixes(model.components)
    if "base" in model.components and model.decoder_cfg.tie_embeddings:
        ignore += ("llm.lm_head.",)
    tensors = tensor_io.read_tensors(path)
    return _load_tensors(model, star_table.star_entries(model), tensors, source=f"star:{path}", ignore=ignore)


def load_source(model: nnx.Module, workdir: str, source: str) -> set[str]:
    """Applies one `init_from` source (see the module docstring); returns the flat param paths it set."""
    kind, sep, path = source.partition(":")
    if not sep:
        return load_from_stage(model, workdir, source)
    if kind == "stage":
        parent, name = os.path.split(os.path.normpath(path))
        return load_from_stage(model, parent, name)
    if kind == "hf":
        return load_hf(model, path)
    if kind == "vq":
        return load_vq(model, path)
    if kind == "star":
        return load_star_file(model, path)
    raise ValueError(
        f"config.train.init_from entry {source!r}: expected a stage name, "
        "'stage:<dir>', 'hf:<dir>', 'vq:<file>' or 'star:<file>'"
    )


def initialise(model: nnx.Module, config, workdir: str) -> None:
    """Applies `config.train.init_from` in order (later wins), then copies the stack from the base's
    last layers when no source loaded it and `config.model.star.stack_init == "copy_last"`.
    Call under the model's mesh (`sharding.use_mesh`)."""
    loaded: set[str] = set()
    for source in config.train.init_from:
        loaded |= load_source(model, workdir, source)
        logging.info("init_from %s: %d params", source, len(loaded))
    if "stacked_ar" in model.components and not any(p.startswith("stacked_ar/") for p in loaded):
        if config.model.star.stack_init == "copy_last":
            model.copy_stack_from_base()
            logging.info("stacked AR initialised from the base's last %d layers", config.model.star.stack_layers)


# -- a trained workdir ------------------------------------------------------------------------------


def read_stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
    """The config saved in `workdir/<stage>/config.json`."""
    with open(os.path.join(workdir, stage, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def first_trained_stage(workdir: str, stages: Sequence[str]) -> tuple[str, ml_collections.ConfigDict] | None:
    """(name, saved config) of the first of `stages` under `workdir` with a config.json and a checkpoint, or None."""
    for name in stages:
        if not os.path.exists(os.path.join(workdir, name, "config.json")):
            continue
        ckpts = checkpointing.StageCheckpoints(workdir, name, read_only=True)
        try:
            has = ckpts.latest_step() is not None
        finally:
            ckpts.close()
        if has:
            return name, read_stage_config(workdir, name)
    return None


def load_workdir(workdir: str, stages: Sequence[str]) -> tuple[star.Star, ml_collections.ConfigDict, str]:
    """The first of `stages` under `workdir` with a config.json and a checkpoint, on one device.

    Builds that stage's model (its registry components) on a single-device mesh and restores its
    params (frozen + newest step). Returns (model, saved config, stage name); e.g.
    `runner.StarRunner(*load_workdir(w, ("editing", "generation"))[:2])`.
    Raises:
      WorkdirError naming the workdir when it does not exist or holds none of `stages`.
    """
    if not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir!r} does not exist")
    stages = tuple(stages)
    found = first_trained_stage(workdir, stages)
    if found is None:
        raise WorkdirError(f"--workdir {workdir!r} has no trained {' or '.join(stages)} checkpoint")
    name, config = found
    mesh, rules = sharding.single_device_mesh(), sharding.DEFAULT_RULES
    model = sharding.create_sharded(lambda: build_star(config, name, rngs=nnx.Rngs(0)), mesh, rules)
    with sharding.use_mesh(mesh, rules):
        load_from_stage(model, workdir, name)
    return model, config, name
