"""Import of reference STAR weights into a star_jax stage directory (ready to generate or train on).

Sources, merged by name (the first source that holds a name wins):
  1. the reference STAR state dict: `.safetensors` (or a directory of them); a `.pt` / `.pth`
     (`{'state_dict': ...}`, read with `torch.load(weights_only=True)`) only with `allow_pickle`;
  2. the base's Hugging Face Qwen2.5-VL / Qwen2 directory, its names put under `llm.`;
  3. the VQ weights (standalone `encoder.*` or STAR `pixel_encoder.*` names), under `pixel_encoder.`.
Every tensor is checked against the one mapping table (`mapping.star_entries`): missing,
unexpected and mis-shaped tensors are reported together, and a dtype that differs from the
target param's is an error naming the tensor unless `cast=True`. The result is written with
`StageCheckpoints` exactly as the trainer lays a stage out: frozen params in `frozen/`, trainable
params + a fresh optimizer state + other variables at step 0, the config, and `DONE`, so
`tasks.load_from_stage` (generation, evaluation, a next stage's `init_from`) reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpointing, optim, sharding
from star_jax.convert import hf, hf_vision, mapping, vq_mapping
from star_jax.convert.checkpoint_files import (
    PICKLE_SUFFIXES,
    CheckpointError,
    SafetensorsFile,
    TensorDirectory,
    load_torch_weights_only,
)
from star_jax.models import star

# Prefixes of a reference state dict that star_jax has no module for.
IGNORED_PREFIXES = ("diffusion_decoder.",)
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip container


def read_reference(path: str, *, allow_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """name -> tensor of a reference weights file or directory (lazy for safetensors).

    Raises CheckpointError naming the file: a pickle (`.pt`, `.pth`) without `allow_pickle`,
    other pickle formats always, a pickle or zip named `.safetensors`, a truncated file.
    """
    if os.path.isdir(path):
        return TensorDirectory(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{path}: is a pickle / torch.save file, not safetensors; refusing to read it")
        return SafetensorsFile(path)
    if path.endswith((".pt", ".pth")):
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: pickle files are refused; pass --allow_pickle to read it with "
                "torch.load(weights_only=True), or convert it to .safetensors"
            )
        return load_torch_weights_only(path)
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: pickle format refused (only .pt / .pth with --allow_pickle, or .safetensors)")
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth or a directory)")


def _shape(tensors, name):
    return tuple(tensors.shape(name) if hasattr(tensors, "shape") else np.shape(tensors[name]))


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
        return _shape(tensors, inner)

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
        merged.add(star_path, read_reference(star_path, allow_pickle=allow_pickle))
    if hf_dir:
        tensors = hf_vision.CanonicalNames(TensorDirectory(hf_dir), hf_dir)
        merged.add(hf_dir, tensors, mapping.STAR_PREFIXES["base"])
    if vq_path:
        tensors = read_reference(vq_path, allow_pickle=allow_pickle)
        try:
            prefix = vq_mapping.detect_prefix(tensors)
        except KeyError as e:
            raise CheckpointError(f"{vq_path}: {e.args[0]}") from None
        merged.add(vq_path, tensors, mapping.STAR_PREFIXES["vq"], strip=prefix)
    if not len(merged):
        raise CheckpointError("nothing to import: give a STAR checkpoint, a Hugging Face directory or VQ weights")
    return merged


def load_star(config, tensors: Mapping, *, stage: str | None = None, cast: bool = False, source: str = "reference"):
    """A `star.Star` of `config`'s stage with every param (and the VQ usage buffer) from `tensors`.

    Args:
      tensors: reference names -> arrays (e.g. `reference_tensors(...)`); a missing
        `pixel_encoder.quantize.codebook_used` keeps its empty initial value.
      cast: convert tensors whose dtype differs from the param's; otherwise that is an error.
    Raises:
      CheckpointError naming missing / unexpected / mis-shaped / wrong-dtype tensors.
    """
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, abstract = nnx.get_abstract_model(lambda: star.build(config, stage, rngs=nnx.Rngs(0)), mesh)
        model = nnx.merge(graphdef, abstract)
        entries = mapping.star_entries(model)
        flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(abstract)}
        tensors = _with_usage_default(tensors, flat)
        dtype_of = tensors.dtype if hasattr(tensors, "dtype") else lambda n: tensors[n].dtype if n in tensors else None
        mapping.check_dtypes(entries, {p: a.dtype for p, a in flat.items()}, dtype_of, source=source, cast=cast)
        ignore = IGNORED_PREFIXES
        if "base" in model.components and model.decoder_cfg.tie_embeddings:
            ignore += ("llm.lm_head.",)  # a tied checkpoint may still carry a copy
        state = hf.load_params(abstract, entries, tensors, source=source, ignore_prefixes=ignore)
        return nnx.merge(graphdef, state)


def _with_usage_default(tensors: Mapping, flat: dict) -> Mapping:
    name = mapping.STAR_PREFIXES["vq"] + "quantize.codebook_used"
    if "vq/quantize/codebook_used" not in flat or name in tensors:
        return tensors
    merged = tensors if isinstance(tensors, MergedTensors) else MergedTensors()
    if merged is not tensors:
        merged.add("reference", tensors)
    shape = flat["vq/quantize/codebook_used"].shape
    merged.add("default", {name: np.full(shape, -1.0, np.float32)})
    return merged


_DECODER_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
_DECODER_FIELDS += ("intermediate_size", "rope_theta", "mrope_section", "mrope_interleaved", "rms_eps")
_DECODER_FIELDS += ("tie_embeddings",)
_VISION_FIELDS = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size")
_VISION_FIELDS += ("temporal_patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes")


def check_hf_config(config, hf_dir: str) -> None:
    """Raises naming every field where the HF directory's config.json (either shape) disagrees with
    `config.model`: values that shapes cannot catch (RoPE theta and sections, eps, window, ...)."""
    from star_jax.models import qwen2, vision

    hf_json = hf.read_config(hf_dir)
    ours, theirs = qwen2.DecoderConfig.from_dict(config.model.decoder), hf.decoder_config_from_hf(hf_json)
    text = dict(hf_json.get("text_config") or hf_json)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf_json.get("rope_scaling") or {}
    fields = [f for f in _DECODER_FIELDS if f != "mrope_section" or "mrope_section" in rope]
    wrong = [f"{f}: config {getattr(ours, f)!r}, {hf_dir} {getattr(theirs, f)!r}" for f in fields]
    wrong = [w for w, f in zip(wrong, fields) if getattr(ours, f) != getattr(theirs, f)]
    if hf_json.get("vision_config") and "vision" in config.model:
        v_ours = vision.VisionConfig.from_dict(config.model.vision)
        v_theirs = hf_vision.vision_config_from_hf(hf_json)
        wrong += [
            f"vision.{f}: config {getattr(v_ours, f)!r}, {hf_dir} {getattr(v_theirs, f)!r}"
            for f in _VISION_FIELDS
            if tuple(np.atleast_1d(getattr(v_ours, f))) != tuple(np.atleast_1d(getattr(v_theirs, f)))
        ]
    if wrong:
        raise CheckpointError(f"{hf_dir}/config.json does not match the star_jax config: " + "; ".join(wrong))


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
    """
    if hf_dir:
        check_hf_config(config, hf_dir)
    tensors = reference_tensors(star_path, hf_dir, vq_path, allow_pickle=allow_pickle)
    source = " + ".join(p for p in (star_path, hf_dir, vq_path) if p)
    model = load_star(config, tensors, stage=stage, cast=cast, source=source)
    return save_stage(model, config, workdir, stage) | {"tensors": len(tensors)}
