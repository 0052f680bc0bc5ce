"""Reading and writing VQ weights: `.safetensors` (lazy, memory-mapped) or `.pt` via `weights_only`.

`read_tensors(path)` opens a `.safetensors` file, a Hugging Face style directory, or a `.pt` /
`.pth` state dict through `torch.load(weights_only=True)` (nothing else is ever unpickled; other
pickle suffixes are refused). `load_vq(path)` builds a `VQModel` from reference names, standalone
(`encoder.*`, `quantize.*`) or nested in a STAR checkpoint (`pixel_encoder.*`), with its config read
off the tensor shapes unless given; params are placed straight into their shardings one tensor at
a time, and a mismatch raises one `CheckpointError` listing missing, unexpected and mis-shaped
tensors. `save_vq(model, path)` writes the same names back (bit-exact round trip).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert import vq_mapping
from star_jax.convert.checkpoint_files import (
    PICKLE_SUFFIXES,
    CheckpointError,
    SafetensorsFile,
    TensorDirectory,
    load_torch_weights_only,
    save_safetensors,
)
from star_jax.models import vq

TORCH_SUFFIXES = (".pt", ".pth")


def read_tensors(path: str) -> Mapping[str, np.ndarray]:
    """name -> numpy tensor of a weights file or directory (see module docstring)."""
    if os.path.isdir(path):
        return TensorDirectory(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(TORCH_SUFFIXES):
        return load_torch_weights_only(path)
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickle files other than .pt/.pth are refused (nothing is unpickled); "
            "save the state dict as .safetensors or as a .pt of plain tensors"
        )
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth or a directory)")


def write_tensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` to `.safetensors` (atomic), or to `.pt` / `.pth` as a plain `{name: tensor}`
    state dict that `torch.load(weights_only=True)` reads."""
    if path.endswith(".safetensors"):
        save_safetensors(path, tensors, metadata={"format": "pt"})
    elif path.endswith(TORCH_SUFFIXES):
        import torch

        def to_torch(v):
            v = np.array(v, copy=True)  # writable and contiguous (safetensors inputs may be read-only memmaps)
            if v.dtype == ml_dtypes.bfloat16:
                return torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(v)

        torch.save({k: to_torch(v) for k, v in tensors.items()}, path)
    else:
        raise CheckpointError(f"{path}: can only write .safetensors, .pt or .pth")


def load_vq(
    path: str,
    cfg: vq.VQConfig | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    **overrides,
) -> vq.VQModel:
    """A `VQModel` with the weights of `path` (standalone VQ or `pixel_encoder.`-prefixed STAR names).

    Args:
      path: `.safetensors`, directory, or `.pt` / `.pth` (weights_only).
      cfg: the model config; None reads the sizes off the tensor shapes (plus `overrides`, e.g.
        attn_heads, norm_groups, image_size, dtype, chunk_size).
      mesh / rules: where the params live (default: one device).
    Raises:
      CheckpointError naming the file, or listing missing / unexpected / mis-shaped tensors.
    """
    from star_jax.convert.hf import load_params

    tensors = read_tensors(path)
    try:
        prefix = vq_mapping.detect_prefix(tensors)
        if cfg is None:
            fields = vq_mapping.infer_config_fields(tensors, prefix)
            factor = 2 ** (len(fields["ch_mult"]) - 1)
            fields.setdefault("image_size", 384 if 384 % factor == 0 else 8 * factor)
            cfg = vq.VQConfig(**(fields | overrides))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    mesh = mesh or sharding.single_device_mesh()
    defaults = {"quantize.codebook_used": np.full((cfg.usage_window_size,), -1.0, np.float32)}
    view = vq_mapping.SubView(tensors, prefix, defaults)
    source = path + (f" (tensors under {prefix!r})" if prefix else "")
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0)), mesh)
        table = vq_mapping.entries(vq_mapping.state_paths(abstract))
        state = load_params(abstract, table, view, source=source)
        return nnx.merge(graphdef, state)


def save_vq(model: vq.VQModel, path: str, *, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Writes the model's params and usage buffer under reference names (`prefix` 'pixel_encoder.'
    for STAR layout); returns name -> shape of what was written."""
    tensors = vq_mapping.to_reference(nnx.state(model), prefix)
    write_tensors(path, tensors)
    return {k: v.shape for k, v in tensors.items()}
