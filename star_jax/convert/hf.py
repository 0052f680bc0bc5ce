"""Import of Hugging Face Qwen2 / Qwen2.5-VL directories into standalone star_jax models.

`load_hf_decoder(path)` -> `qwen2.Decoder`, `load_hf_vision(path)` -> `vision.VisionTower`,
`load_hf_vlm(path)` -> `vlm.VisionLanguageModel` (tower + decoder). `config.json` is read in both
shapes (`hf_config`), weights from `model.safetensors` or a sharded index (never a pickle), and
the params are placed straight into their shardings, one tensor at a time (`table.fill_state`).
Tensor names: the on-disk layout of the published checkpoints and of `save_pretrained`
(`visual.*`, `model.layers.*`, `lm_head.weight`) and the transformers >= 5 in-memory layout
(`model.visual.*`, `model.language_model.*`) are both accepted, through `CanonicalNames`.
Every mismatch is reported in one `CheckpointError` (missing / unexpected / mis-shaped).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert.decoder_table import decoder_entries
from star_jax.convert.hf_config import QWEN_IMAGE_TOKEN_ID, decoder_config_from_hf, read_config, vision_config_from_hf
from star_jax.convert.table import CheckpointError, fill_state, tensor_shape
from star_jax.convert.tensor_io import TensorDirectory
from star_jax.convert.vision_table import vision_entries
from star_jax.models import qwen2, vision, vlm

# transformers >= 5 in-memory prefix -> on-disk prefix
_V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_name(name: str) -> str:
    """The on-disk (published / save_pretrained) name of a Qwen2.5-VL tensor name in either layout."""
    for v5, disk in _V5_PREFIXES:
        if name.startswith(v5):
            return disk + name[len(v5) :]
    return name


class CanonicalNames(Mapping):
    """A read-only view of a tensor mapping under on-disk names, whichever layout it was saved in.

    canonical: name -> on-disk name (default `canonical_name`; `star_table.canonical_star_name`
    for a STAR state dict)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, canonical=canonical_name):
        self._tensors = tensors
        self._names: dict[str, str] = {}
        clashes = []
        for name in tensors:
            canon = canonical(name)
            if canon in self._names:
                clashes.append(f"{self._names[canon]} / {name}")
            self._names[canon] = name
        if clashes:
            raise CheckpointError(f"{source}: tensors present under both name layouts: " + ", ".join(clashes[:20]))

    def __getitem__(self, name):
        return self._tensors[self._names[name]]

    def shape(self, name) -> tuple[int, ...]:
        return tensor_shape(self._tensors, self._names[name])

    def dtype(self, name) -> np.dtype:
        """The stored dtype, without reading a lazy tensor."""
        inner = self._names[name]
        return np.dtype(self._tensors.dtype(inner)) if hasattr(self._tensors, "dtype") else self._tensors[inner].dtype

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def read_directory(path: str) -> CanonicalNames:
    """The tensors of a Hugging Face directory under on-disk names (lazy, memory-mapped)."""
    return CanonicalNames(TensorDirectory(path), path)


def _load(path, make_model, entries, ignore_prefixes, mesh, rules):
    tensors = read_directory(path)
    mesh = mesh or sharding.single_device_mesh()
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(make_model, mesh)
        state = fill_state(abstract, entries, tensors, source=path, ignore_prefixes=ignore_prefixes)
        return nnx.merge(graphdef, state)


def load_hf_decoder(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    **config_overrides,
) -> qwen2.Decoder:
    """Loads the text decoder of a local Qwen2 or Qwen2.5-VL Hugging Face directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype / param_dtype: compute and storage dtypes of the returned model.
      mesh / rules: where params live (default: a 1-device mesh); placed shard by shard.
      config_overrides: DecoderConfig fields such as scan_layers or remat_policy.
    Returns:
      a `qwen2.Decoder`; `model(input_ids [B, T] int32, positions)` -> float32 logits [B, T, V].
    Raises:
      CheckpointError naming the file, or listing missing / unexpected / mis-shaped tensors.
    """
    cfg = decoder_config_from_hf(read_config(path), dtype=dtype, param_dtype=param_dtype, **config_overrides)
    return _load(
        path,
        lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(0)),
        decoder_entries(cfg.tie_embeddings),
        # Parts of a Qwen2.5-VL directory that are not the text decoder; a tied checkpoint may
        # still carry an lm_head copy.
        ("visual.",) + (("lm_head.",) if cfg.tie_embeddings else ()),
        mesh,
        rules,
    )


def load_hf_vision(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    **config_overrides,
) -> vision.VisionTower:
    """Loads the vision tower of a local Qwen2.5-VL Hugging Face directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype / param_dtype: compute and storage dtypes; mesh / rules: where params live.
      config_overrides: VisionConfig fields such as scan_layers or remat_policy.
    Returns:
      a `vision.VisionTower`; `tower(pixel_values [N, patch_dim], grid_thw)` -> [N / 4, out_hidden].
    Raises:
      CheckpointError naming the file, or listing missing / unexpected / mis-shaped tensors.
    """
    cfg = vision_config_from_hf(read_config(path), dtype=dtype, param_dtype=param_dtype, **config_overrides)
    return _load(
        path,
        lambda: vision.VisionTower(cfg, rngs=nnx.Rngs(0)),
        vision_entries(cfg),
        ("model.", "lm_head."),  # the text decoder
        mesh,
        rules,
    )


def load_hf_vlm(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    vision_overrides: Mapping | None = None,
    **decoder_overrides,
) -> vlm.VisionLanguageModel:
    """Loads a whole local Qwen2.5-VL Hugging Face directory (vision tower + text decoder).

    Args:
      path: directory with config.json (published or transformers >= 5 shape) and safetensors.
      dtype / param_dtype: compute and storage dtypes of both parts.
      mesh / rules: where params live (default: a 1-device mesh); placed tensor by tensor.
      vision_overrides: VisionConfig fields (e.g. scan_layers); decoder_overrides: DecoderConfig fields.
    Returns:
      a `vlm.VisionLanguageModel`; `model(input_ids, pixel_values, grid_thw)` -> logits [B, T, V] f32.
    Raises:
      CheckpointError naming the file, or listing missing / unexpected / mis-shaped tensors.
    """
    config = read_config(path)
    dec_cfg = decoder_config_from_hf(config, dtype=dtype, param_dtype=param_dtype, **decoder_overrides)
    vis_cfg = vision_config_from_hf(config, dtype=dtype, param_dtype=param_dtype, **dict(vision_overrides or {}))
    image_token_id = int(config.get("image_token_id", QWEN_IMAGE_TOKEN_ID))
    entries = decoder_entries(dec_cfg.tie_embeddings, flax_prefix="decoder/")
    entries += vision_entries(vis_cfg, flax_prefix="tower/")
    return _load(
        path,
        lambda: vlm.VisionLanguageModel(vis_cfg, dec_cfg, image_token_id=image_token_id, rngs=nnx.Rngs(0)),
        entries,
        ("lm_head.",) if dec_cfg.tie_embeddings else (),  # a tied checkpoint may still carry a copy
        mesh,
        rules,
    )
