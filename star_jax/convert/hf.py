"""Import of Hugging Face Qwen2 / Qwen2.5-VL directories into star_jax models.

`load_hf_decoder(path)` reads `config.json` in both shapes (the published checkpoints' top-level
text keys with `rope_scaling`, and the transformers >= 5 `text_config` / `rope_parameters`), the
weights from `model.safetensors` or a sharded index (never a pickle), and returns a
`qwen2.Decoder` whose params are placed straight into their shardings, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert import mapping
from star_jax.convert.checkpoint_files import CheckpointError, TensorDirectory
from star_jax.models import qwen2


def read_config(path: str) -> dict:
    """The parsed config.json of a Hugging Face model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def decoder_config_from_hf(hf: Mapping, **overrides) -> qwen2.DecoderConfig:
    """A DecoderConfig from a Qwen2 / Qwen2.5-VL config.json dict (either shape)."""
    text = dict(hf.get("text_config") or hf)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 10000.0)))
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    mrope = rope.get("mrope_section")
    if mrope is None:  # plain Qwen2: 1-D RoPE; any split of the frequencies is equivalent
        half = head_dim // 2
        mrope = (half, 0, 0)
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return qwen2.DecoderConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=text["intermediate_size"],
        rope_theta=float(theta),
        mrope_section=tuple(mrope),
        rms_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(tie),
        **overrides,
    )


def _shape(tensors, name: str) -> tuple[int, ...]:
    # Lazy tensor files report shapes without reading data; plain dicts hold arrays.
    return tuple(tensors.shape(name) if hasattr(tensors, "shape") else np.shape(tensors[name]))


def load_params(
    abstract_state,
    entries: Iterable[mapping.Entry],
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
):
    """Fills an abstract nnx state (ShapeDtypeStructs with shardings) from reference tensors.

    Every problem is collected first, then raised as one CheckpointError listing missing,
    unexpected and mis-shaped tensors. Tensors are converted and placed one at a time.
    """
    flat = dict(nnx.to_flat_state(abstract_state))
    by_path = {"/".join(map(str, k)): k for k in flat}
    entries = list(entries)
    missing, misshaped, used = [], [], set()
    for e in entries:
        if e.flax not in by_path:
            raise KeyError(f"mapping entry {e.flax!r} has no star_jax param (model/table mismatch)")
        shape = flat[by_path[e.flax]].get_value().shape
        for name, want in mapping.ref_names(e, shape):
            used.add(name)
            if name not in tensors:
                missing.append(name)
            elif (got := _shape(tensors, name)) != want:
                misshaped.append(f"{name}: expected {want}, found {got}")
    unexpected = sorted(n for n in tensors if n not in used and not n.startswith(ignore_prefixes))
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))
    for e in entries:
        var = flat[by_path[e.flax]]
        abstract = var.get_value()
        value = mapping.to_flax(e, lambda n: tensors[n], abstract.shape).astype(abstract.dtype)
        var.set_value(jax.device_put(value, abstract.sharding))
    return nnx.from_flat_state(flat)


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
    tensors = TensorDirectory(path)
    mesh = mesh or sharding.single_device_mesh()
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
        state = load_params(
            abstract,
            mapping.decoder_entries(cfg.tie_embeddings),
            tensors,
            source=path,
            # Parts of a Qwen2.5-VL directory that are not the text decoder; a tied checkpoint may
            # still carry an lm_head copy.
            ignore_prefixes=("visual.",) + (("lm_head.",) if cfg.tie_embeddings else ()),
        )
        return nnx.merge(graphdef, state)
