"""Import of reference STAR weights into a star_jax stage directory (ready to generate or train on).

Sources, merged by name (the first source that holds a name wins):
  1. the reference STAR state dict: `.safetensors` (or a directory of them); a `.pt` / `.pth`
     (`{'state_dict': ...}`, read with `torch.load(weights_only=True)`) only with `allow_pickle`;
  2. the base's Hugging Face Qwen2.5-VL / Qwen2 directory, its names put under `llm.`;
  3. the VQ weights (standalone `encoder.*` or STAR `pixel_encoder.*` names), under `pixel_encoder.`.
Every tensor is checked against the mapping table (`star_table.star_entries`): missing,
unexpected and mis-shaped tensors are reported together, and a dtype that differs from the
target param's is an error naming the tensor unless `cast=True`. The result is written with
`StageCheckpoints` exactly as the trainer lays a stage out: frozen params in `frozen/`, trainable
params + a fresh optimizer state + other variables at step 0, the config, and `DONE`, so
`init_sources.load_from_stage` (generation, evaluation, a next stage's `init_from`) reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpointing, optim, sharding
from star_jax.convert import hf, hf_config, star_table, tensor_io, vq_table
from star_jax.convert.stage_reader import build_star
from star_jax.convert.table import CheckpointError, check_dtypes, fill_state, tensor_shape
from star_jax.models import star


class MergedTensors(Mapping):
    """Reference-named view over several sources: name -> (source, name in it, label); first wins."""

    def __init__(self):
        self._where: dict[str, tuple[Mapping, str, str]] = {}

    def add(self, label: str, tensors: Mapping, prefix: str = "", *, strip: str = "") -> int:
        """Adds `tensors`' names (minus `strip`, plus `prefix`) not present yet; returns how many."""
        n = 0
        for name in tensors:
            if strip and not name.startswith(strip):
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
        merged.add(star_path, tensor_io.read_tensors(star_path, allow_pickle=allow_pickle))
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
        tensors = _with_usage_default(tensors, flat)
        dtype_of = tensors.dtype if hasattr(tensors, "dtype") else lambda n: tensors[n].dtype if n in tensors else None
        check_dtypes(entries, {p: a.dtype for p, a in flat.items()}, dtype_of, source=source, cast=cast)
        ignore = star_table.IGNORED_PREFIXES
        if "base" in model.components and model.decoder_cfg.tie_embeddings:
            ignore += ("llm.lm_head.",)  # a tied checkpoint may still carry a copy
        state = fill_state(abstract, entries, tensors, source=source, ignore_prefixes=ignore)
        return nnx.merge(graphdef, state)


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


def save_stage(model: star.Star, config, workdir: str, stage: str | None = None) -> dict:
    """Writes `model` as step 0 of `workdir/<stage>` in the trainer's layout (see module docstring).

    Refuses a stage directory that already holds a checkpoint. Returns counts of what was written.
    """
    stage = stage or config.stage
    ckpts = checkpointing.StageCheckpoints(workdir, stage, async_save=False)
    try:
        if ckpts.latest_step() is not None or ckpts.has_frozen():
            raise CheckpointError(f"{ckpts.dir}: already holds a checkpoint; import into a fresh workdir or stage")
        config = config.copy_and_resolve_references()
        config.stage = stage
        ckpts.write_config(config)
        _, params, frozen, other = optim.split_trainable(model, list(config.train.trainable))
        params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
        ckpts.save_frozen(frozen)
        opt_state = jax.jit(optim.make_optimizer(config.train).init)(params)
        state = {"params": params, "opt_state": opt_state, "other": other, "step": jnp.zeros((), jnp.int32)}
        ckpts.save(0, state, force=True)
        ckpts.wait()
        ckpts.mark_done(0)
    finally:
        ckpts.close()
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"stage_dir": ckpts.dir, "step": 0, "trainable": count(params), "frozen": count(frozen)}


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
    """Reference STAR checkpoint (+ HF base directory + VQ weights) -> star_jax stage `workdir/<stage>`.

    Args:
      config: the star_jax config whose model matches the weights (e.g. size=3b, stage=generation);
        `config.model.*.param_dtype` is the dtype the tensors must have (unless `cast`).
      stage: the stage directory to write (default `config.stage`).
    Returns:
      {"stage_dir", "step", "trainable", "frozen", "tensors"}.
    Raises:
      CheckpointError naming the file, the mismatching config.json fields, or the tensors.
    """
    if hf_dir:
        hf_config.check_star_config(config, hf_dir)
    tensors = reference_tensors(star_path, hf_dir, vq_path, allow_pickle=allow_pickle)
    source = " + ".join(p for p in (star_path, hf_dir, vq_path) if p)
    model = load_star(config, tensors, stage=stage, cast=cast, source=source)
    return save_stage(model, config, workdir, stage) | {"tensors": len(tensors)}
