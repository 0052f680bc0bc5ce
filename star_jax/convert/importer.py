"""Import of reference weights into a star_jax stage directory (ready to generate or train on).

Two routes, by what is given:
- **No STAR file** (the lab's path: `--hf` Qwen2.5-VL directory and / or `--vq` file): the stage's
  model is built sharded on `config.mesh` and filled by `init_sources.initialise` with
  `init_from = ("hf:<dir>", "vq:<file>")`: the base decoder and ViT from the directory (its
  config.json checked against the size), the VQ from the reference-layout file, the stacked AR copied
  from the base's last N layers, the pixel adapter, image head and PatchGAN freshly initialised.
  Every frozen-by-nature part the stage has must come from a source: `base` / `vision` need
  `--hf`, `vq` needs `--vq`. Tensors are cast to the params' dtype.
- **A STAR file** (`--star`, plus optionally `--hf` / `--vq` for the parts it lacks), merged by name
  (the first source that holds a name wins):
  1. the reference STAR state dict: `.safetensors` (or a directory of them); a `.pt` / `.pth`
     (`{'state_dict': ...}`, read with `torch.load(weights_only=True)`) only with `allow_pickle`;
  2. the base's Hugging Face Qwen2.5-VL / Qwen2 directory, its names put under `llm.`;
  3. the VQ weights (standalone `encoder.*` or STAR `pixel_encoder.*` names), under `pixel_encoder.`.
  Every tensor is checked against the mapping table (`star_table.star_entries`): missing,
  unexpected and mis-shaped tensors are reported together, and a dtype that differs from the
  target param's is an error naming the tensor unless the param's dtype holds every value of it
  (a released bf16 file into float32 params) or `cast=True`. The released layout imports as it
  is: names written by newer transformers (`llm.model.language_model.*`, `llm.model.visual.*`)
  are read as the released ones, an int64 usage buffer of the model's window is loaded (code
  indices are exact in float32), and buffers the model does not hold (integer tensors no
  parameter reads, a usage window of another length) are skipped with one log line. Parts the reference has no
  tensors for (the PatchGAN, a project's parts) are freshly initialised.
Every source is checked before anything is written. The stage is written with `StageCheckpoints`
exactly as the trainer lays it out (frozen params in `frozen/`, trainable params + a fresh optimizer
state + other variables at step 0, `DONE`, then `config.json`) into a temporary directory renamed
into place at the end, so a failed import leaves nothing. An HF directory's `tokenizer.json` is
copied into the workdir and the stage's `config.data.tokenizer` points at it (the tokenizer travels
with the weights); the saved `config.train.init_from` records the sources.
`star-jax train` of the stage resumes from step 0 (no re-initialisation).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpointing, init_sources, optim, sharding, stages
from star_jax.convert import hf, star_table, tensor_io, vq_table
from star_jax.convert.stage_reader import build_star
from star_jax.convert.table import CheckpointError, check_dtypes, fill_state, ref_names, tensor_shape
from star_jax.models import star

USAGE = star_table.STAR_PREFIXES["vq"] + vq_table.USAGE_NAME  # the VQ's usage buffer, reference name
# The parts an import must load from a source (the rest may start fresh), and the flag that gives them.
REQUIRED_PARTS = {"base": "--hf", "vision": "--hf", "vq": "--vq"}


class MergedTensors(Mapping):
    """Reference-named view over several sources: name -> (source, name in it, label); first wins."""

    def __init__(self):
        self._where: dict[str, tuple[Mapping, str, str]] = {}

    def add(self, label: str, tensors: Mapping, prefix: str = "", *, strip: str = "", exclude=()) -> int:
        """Adds `tensors`' names (minus `strip`, plus `prefix`) not present yet and not in `exclude`;
        returns how many."""
        n = 0
        for name in tensors:
            if (strip and not name.startswith(strip)) or name in exclude:
                continue
            full = prefix + name[len(strip) :]
            if full not in self._where:
                self._where[full] = (tensors, name, label)
                n += 1
        return n

    def __getitem__(self, name: str) -> np.ndarray:
        tensors, inner, _ = self._where[name]
        return tensors[inner]

    def shape(self, name: str) -> tuple[int, ...]:
        tensors, inner, _ = self._where[name]
        return tensor_shape(tensors, inner)

    def dtype(self, name: str) -> np.dtype | None:
        """The stored dtype (memory-mapped files are not read), or None when absent."""
        if name not in self._where:
            return None
        tensors, inner, _ = self._where[name]
        return np.dtype(tensors.dtype(inner)) if hasattr(tensors, "dtype") else np.asarray(tensors[inner]).dtype

    def source(self, name: str) -> str:
        return self._where[name][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def reference_tensors(
    star_path: str | None = None,
    hf_dir: str | None = None,
    vq_path: str | None = None,
    *,
    allow_pickle: bool = False,
) -> MergedTensors:
    """The merged reference tensors of the three sources (see the module docstring)."""
    merged = MergedTensors()
    if star_path:
        merged.add(
            star_path, star_table.star_tensors(tensor_io.read_tensors(star_path, allow_pickle=allow_pickle), star_path)
        )
    if hf_dir:
        merged.add(hf_dir, hf.read_directory(hf_dir), star_table.STAR_PREFIXES["base"])
    if vq_path:
        tensors = tensor_io.read_tensors(vq_path, allow_pickle=allow_pickle)
        try:
            prefix = vq_table.detect_prefix(tensors)
        except KeyError as e:
            raise CheckpointError(f"{vq_path}: {e.args[0]}") from None
        merged.add(vq_path, tensors, star_table.STAR_PREFIXES["vq"], strip=prefix)
    if not len(merged):
        raise CheckpointError("nothing to import: give a STAR checkpoint, a Hugging Face directory or VQ weights")
    return merged


def load_star(config, tensors: Mapping, *, stage: str | None = None, cast: bool = False, source: str = "reference"):
    """A `star.Star` of `config`'s stage (on one device) with every param (and the VQ usage buffer)
    from `tensors`.

    Args:
      tensors: reference names -> arrays (e.g. `reference_tensors(...)`); a missing
        `pixel_encoder.quantize.codebook_used` keeps its empty initial value.
      cast: convert tensors whose dtype differs from the param's; otherwise that is an error.
    Raises:
      CheckpointError naming missing / unexpected / mis-shaped / wrong-dtype tensors.
    """
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, abstract = nnx.get_abstract_model(lambda: build_star(config, stage, rngs=nnx.Rngs(0)), mesh)
        model = nnx.merge(graphdef, abstract)
        entries = star_table.star_entries(model)
        flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(abstract)}
        tensors = _with_usage_default(_without_foreign_buffers(tensors, entries, flat, source), flat)
        dtype_of = tensors.dtype if hasattr(tensors, "dtype") else lambda n: tensors[n].dtype if n in tensors else None
        # The usage buffer holds code indices: an int64 one (the reference's) converts exactly.
        usage_int = USAGE in tensors and np.issubdtype(dtype_of(USAGE), np.integer)
        checked = [e for e in entries if not (e.ref == USAGE and usage_int)]
        check_dtypes(checked, {p: a.dtype for p, a in flat.items()}, dtype_of, source=source, cast=cast)
        ignore = star_table.unused_prefixes(model.components)  # parts the stage lacks (a VQ stage: all but the VQ)
        if "base" in model.components and model.decoder_cfg.tie_embeddings:
            ignore += ("llm.lm_head.",)  # a tied checkpoint may still carry a copy
        state = fill_state(abstract, entries, tensors, source=source, ignore_prefixes=ignore)
        state = _fresh_uncovered(state, config, stage, mesh)
        return nnx.merge(graphdef, state)


def _fresh_uncovered(state, config, stage: str | None, mesh):
    """`state` with the variables no reference tensor filled (the PatchGAN, a project's parts) taken
    from a freshly initialised model; unchanged when every variable was filled."""
    flat = dict(nnx.to_flat_state(state))
    empty = [k for k, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if not empty:
        return state
    fresh = sharding.create_sharded(
        lambda: build_star(config, stage, rngs=nnx.Rngs(config.seed)), mesh, sharding.DEFAULT_RULES
    )
    fresh_flat = dict(nnx.to_flat_state(nnx.state(fresh)))
    for k in empty:
        flat[k].set_value(fresh_flat[k].get_value())
    return nnx.from_flat_state(flat)


def _without_foreign_buffers(tensors: Mapping, entries, flat: dict, source: str) -> Mapping:
    """`tensors` less the buffers the model does not hold, with one log line naming them: integer
    tensors no entry reads (counters and indices are never weights), and a VQ usage buffer whose
    window differs from the model's (e.g. LlamaGen's 65,536 entries). Unchanged when there are none."""
    read = {name for e in entries if e.flax in flat for name, _ in ref_names(e, tuple(flat[e.flax].shape))}
    dtype_of = tensors.dtype if hasattr(tensors, "dtype") else lambda n: np.asarray(tensors[n]).dtype
    skip = [n for n in tensors if n not in read and np.issubdtype(dtype_of(n), np.integer)]
    window = flat.get("vq/quantize/codebook_used")
    if USAGE in tensors and window is not None and tensor_shape(tensors, USAGE) != tuple(window.shape):
        skip.append(USAGE)
    if not skip:
        return tensors
    logging.info(
        "%s: skipped %d buffer(s) the model does not hold: %s", source, len(skip), ", ".join(sorted(skip)[:10])
    )
    merged = MergedTensors()
    merged.add(source, tensors, exclude=set(skip))
    return merged


def _with_usage_default(tensors: Mapping, flat: dict) -> Mapping:
    name = star_table.STAR_PREFIXES["vq"] + vq_table.USAGE_NAME
    if "vq/quantize/codebook_used" not in flat or name in tensors:
        return tensors
    merged = tensors if isinstance(tensors, MergedTensors) else MergedTensors()
    if merged is not tensors:
        merged.add("reference", tensors)
    shape = flat["vq/quantize/codebook_used"].shape
    merged.add("default", {name: np.full(shape, -1.0, np.float32)})
    return merged


def save_stage(
    model: star.Star, config, workdir: str, stage: str | None = None, *, tokenizer: str | None = None
) -> dict:
    """Writes `model` as step 0 of `workdir/<stage>` in the trainer's layout (see module docstring),
    into a temporary directory renamed into place at the end (a failure leaves nothing).

    Args:
      tokenizer: a tokenizer.json to copy into `workdir` (`init_sources.install_tokenizer`); the
        saved config's `data.tokenizer` points at the copy.
    Refuses a stage that already holds a complete checkpoint (leftovers of a failed start are
    replaced). Returns {"stage_dir", "step", "trainable", "frozen"}.
    """
    stage = stage or config.stage
    final = os.path.abspath(os.path.join(workdir, stage))
    refuse_existing(workdir, stage)
    config = config.copy_and_resolve_references()
    config.stage = stage
    tmp_root = os.path.join(workdir, f".import-{stage}-{os.getpid()}")
    shutil.rmtree(tmp_root, ignore_errors=True)  # an earlier, killed import of this pid
    created = None
    try:
        if tokenizer is not None:
            config.data.tokenizer, new = init_sources.install_tokenizer(tokenizer, workdir)
            created = config.data.tokenizer if new else None
        ckpts = checkpointing.StageCheckpoints(tmp_root, stage, async_save=False)
        try:
            _, params, frozen, other = optim.split_trainable(model, list(config.train.trainable))
            params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
            ckpts.save_frozen(frozen)
            opt_state = jax.jit(optim.make_optimizer(config.train).init)(params)
            state = {"params": params, "opt_state": opt_state, "other": other, "step": jnp.zeros((), jnp.int32)}
            ckpts.write_config_after_save(config)
            ckpts.save(0, state, force=True)
            ckpts.wait()
            ckpts.mark_done(0)
        finally:
            ckpts.close()
        refuse_existing(workdir, stage)  # nobody wrote it meanwhile
        checkpointing.discard_incomplete(workdir, stage)
        os.rename(ckpts.dir, final)
    except BaseException:
        if created:
            os.remove(created)
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"stage_dir": final, "step": 0, "trainable": count(params), "frozen": count(frozen)}


def refuse_existing(workdir: str, stage: str) -> None:
    """Raises CheckpointError when `workdir/<stage>` already holds a complete checkpoint."""
    if checkpointing.has_checkpoint(workdir, stage):
        raise CheckpointError(
            f"{os.path.join(workdir, stage)}: already holds a checkpoint; import into a fresh workdir or stage"
        )


def _check_pickles(allow_pickle: bool, *paths: str | None) -> None:
    for path in paths:
        if path and not allow_pickle and path.endswith(tensor_io.TORCH_SUFFIXES):
            tensor_io.read_tensors(path, allow_pickle=False)  # raises the one message for pickles


def _sources(config, star_path, hf_dir, vq_path) -> tuple[str, ...]:
    """The init sources of the no-STAR-file route; CheckpointError naming the flag a part needs."""
    comps = stages.for_config(config).components
    given = {"--hf": hf_dir, "--vq": vq_path}
    lacking = sorted({flag for part, flag in REQUIRED_PARTS.items() if part in comps and not given[flag]})
    if lacking:
        parts = [p for p, f in REQUIRED_PARTS.items() if p in comps and f in lacking]
        raise CheckpointError(
            f"stage {config.stage!r} needs {', '.join(parts)}: pass {' and '.join(lacking)} (or --star FILE)"
        )
    unused = [
        flag
        for flag, path in given.items()
        if path and flag not in {REQUIRED_PARTS[c] for c in comps if c in REQUIRED_PARTS}
    ]
    if unused:
        raise CheckpointError(
            f"stage {config.stage!r} ({', '.join(comps)}) has no part that {' / '.join(unused)} loads"
        )
    if hf_dir and "vision" in comps:
        if not init_sources.check_hf_dir(hf_dir, comps, *init_sources.model_configs(config)[1:])[1]:
            raise CheckpointError(f"{hf_dir}/config.json has no vision_config: stage {config.stage!r} needs a ViT")
    return tuple(f"{kind}:{path}" for kind, path in (("hf", hf_dir), ("vq", vq_path)) if path)


def import_star(
    config,
    workdir: str,
    *,
    star_path: str | None = None,
    hf_dir: str | None = None,
    vq_path: str | None = None,
    stage: str | None = None,
    allow_pickle: bool = False,
    cast: bool = False,
) -> dict:
    """Reference weights -> star_jax stage `workdir/<stage>` (see the module docstring for the routes).

    Args:
      config: the star_jax config whose model matches the weights (e.g. size=3b, stage=generation);
        `config.model.*.param_dtype` is the dtype a STAR file's tensors must have (unless `cast`).
      stage: the stage directory to write (default `config.stage`).
    Returns:
      {"stage_dir", "step", "trainable", "frozen", "tensors", "sources", "tokenizer"}.
    Raises:
      CheckpointError (a ValueError) naming the file, the flag a part needs, the mismatching
      config.json fields, the tokenizer, or the tensors; nothing is written then.
    """
    config = config.copy_and_resolve_references()
    config.stage = stage or config.stage
    comps = stages.for_config(config).components
    if not (star_path or hf_dir or vq_path):
        raise CheckpointError("nothing to import: give a STAR checkpoint, a Hugging Face directory or VQ weights")
    refuse_existing(workdir, config.stage)
    _check_pickles(allow_pickle, star_path, vq_path)
    tokenizer = None
    if hf_dir and config.data.tokenizer == "builtin" and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        tokenizer = os.path.join(hf_dir, "tokenizer.json")
    checked = config.copy_and_resolve_references()
    checked.data.tokenizer = tokenizer or config.data.tokenizer
    if star_path:
        if hf_dir:
            init_sources.check_hf_dir(hf_dir, comps, *init_sources.model_configs(config)[1:])
        init_sources.check_tokenizer(checked, [hf_dir] if hf_dir else [])
        tensors = reference_tensors(star_path, hf_dir, vq_path, allow_pickle=allow_pickle)
        source = " + ".join(p for p in (star_path, hf_dir, vq_path) if p)
        config.train.init_from = tuple(
            f"{k}:{p}" for k, p in (("star", star_path), ("hf", hf_dir), ("vq", vq_path)) if p
        )
        model = load_star(config, tensors, cast=cast, source=source)
        n_tensors = len(tensors)
    else:
        config.train.init_from = _sources(config, star_path, hf_dir, vq_path)
        init_sources.check_sources(config, workdir)
        init_sources.check_tokenizer(checked, [hf_dir] if hf_dir else [])
        mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
        model = sharding.create_sharded(lambda: build_star(config, rngs=nnx.Rngs(config.seed)), mesh, rules)
        with sharding.use_mesh(mesh, rules):
            n_tensors = len(init_sources.initialise(model, config, workdir))
    summary = save_stage(model, config, workdir, tokenizer=tokenizer)
    sources = config.train.init_from
    return summary | {"tensors": n_tensors, "sources": sources, "tokenizer": tokenizer}
