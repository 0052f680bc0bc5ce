"""Standalone VQ weights: a `VQModel` from reference-named tensors, and back.

`load_vq(path)` builds a `VQModel` from reference names, standalone (`encoder.*`, `quantize.*`) or
nested in a STAR checkpoint (`pixel_encoder.*`), from `.safetensors`, a directory, or a `.pt` /
`.pth` read with `torch.load(weights_only=True)`; its config is read off the tensor shapes unless
given. Params are placed straight into their shardings one tensor at a time, and a mismatch raises
one `CheckpointError` listing missing, unexpected and mis-shaped tensors. `save_vq(model, path)`
writes the same names back (bit-exact round trip).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert import tensor_io, vq_table
from star_jax.convert.table import CheckpointError, fill_state
from star_jax.models import vq


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
    tensors = tensor_io.read_tensors(path)
    try:
        prefix = vq_table.detect_prefix(tensors)
        if cfg is None:
            fields = vq_table.infer_config_fields(tensors, prefix)
            factor = 2 ** (len(fields["ch_mult"]) - 1)
            fields.setdefault("image_size", 384 if 384 % factor == 0 else 8 * factor)
            cfg = vq.VQConfig(**(fields | overrides))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    mesh = mesh or sharding.single_device_mesh()
    defaults = {vq_table.USAGE_NAME: np.full((cfg.usage_window_size,), -1.0, np.float32)}
    view = vq_table.SubView(tensors, prefix, defaults)
    source = path + (f" (tensors under {prefix!r})" if prefix else "")
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0)), mesh)
        entries = vq_table.entries(vq_table.state_paths(abstract))
        return nnx.merge(graphdef, fill_state(abstract, entries, view, source=source))


def save_vq(model: vq.VQModel, path: str, *, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Writes the model's params and usage buffer under reference names (`prefix` 'pixel_encoder.'
    for STAR layout) to `.safetensors` or `.pt`; returns name -> shape of what was written."""
    tensors = vq_table.to_reference(nnx.state(model), prefix)
    tensor_io.write_tensors(path, tensors)
    return {k: v.shape for k, v in tensors.items()}
