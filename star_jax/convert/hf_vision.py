"""Import of the Qwen2.5-VL vision tower and of the whole Qwen2.5-VL (tower + decoder) from Hugging Face.

Names: the on-disk layout of the published checkpoints and of `save_pretrained` (STAR_SPEC section 8:
`visual.*`, `model.layers.*`, `lm_head.weight`) and the transformers >= 5 in-memory layout
(`model.visual.*`, `model.language_model.*`) are both accepted; tensors are looked up through
`CanonicalNames`, which presents either as the on-disk names. Weights come from safetensors only,
and every mismatch is reported in one `CheckpointError` (missing / unexpected / mis-shaped), by
`hf.load_params`, the same path as `load_hf_decoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert import hf, mapping
from star_jax.convert.checkpoint_files import CheckpointError, TensorDirectory
from star_jax.models import vision, vlm

# transformers' Qwen2_5_VLVisionConfig defaults, for keys a config.json leaves out.
_HF_VISION_DEFAULTS = dict(
    depth=32,
    hidden_size=3584,
    num_heads=16,
    intermediate_size=3420,
    out_hidden_size=3584,
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)
QWEN_IMAGE_TOKEN_ID = 151655  # <|image_pad|>


def vision_config_from_hf(hf_config: Mapping, **overrides) -> vision.VisionConfig:
    """A VisionConfig from a Qwen2.5-VL config.json dict (its `vision_config`; published or v5 shape)."""
    v = dict(hf_config.get("vision_config") or {})
    if not v:
        raise CheckpointError("config.json has no vision_config (not a Qwen2.5-VL checkpoint)")
    act = v.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"vision_config.hidden_act={act!r}: only 'silu' (Qwen2.5-VL) is supported")
    if "in_chans" in v:  # the published checkpoints' name
        v.setdefault("in_channels", v["in_chans"])
    rope = v.get("rope_parameters") or {}
    fields = {k: v.get(k, default) for k, default in _HF_VISION_DEFAULTS.items()}
    return vision.VisionConfig(
        **fields,
        rms_eps=1e-6,  # transformers hard-codes the vision norms' eps
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        **overrides,
    )


@dataclasses.dataclass(frozen=True)
class PatchConv:
    """torch Conv3d weight (out, C, T, P, P) with stride = kernel <-> Flax kernel [C * T * P * P, out]."""

    kernel: tuple[int, int, int, int]  # (C, T, P, P)

    def to_flax(self, w, shape):
        w = np.asarray(w)
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T).reshape(shape)

    def to_ref(self, x):
        return np.ascontiguousarray(np.asarray(x).T).reshape(x.shape[1], *self.kernel)

    def ref_shape(self, shape):
        return (shape[1], *self.kernel)


def vision_entries(cfg: vision.VisionConfig, flax_prefix: str = "", ref_prefix: str = "visual.") -> list[mapping.Entry]:
    """A `vision.VisionTower` <-> the HF Qwen2.5-VL `visual.*` names (STAR_SPEC section 8)."""
    E, f, r = mapping.Entry, f"{flax_prefix}blocks/", f"{ref_prefix}blocks.{{i}}."
    kernel = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    entries = [
        E(f"{flax_prefix}patch_kernel", f"{ref_prefix}patch_embed.proj.weight", PatchConv(kernel)),
        E(f + "norm1/scale", r + "norm1.weight", mapping.Identity()),
        E(f + "norm2/scale", r + "norm2.weight", mapping.Identity()),
        E(f + "attn/qkv_kernel", r + "attn.qkv.weight", mapping.Linear()),
        E(f + "attn/qkv_bias", r + "attn.qkv.bias", mapping.Reshape()),
        E(f + "attn/proj_kernel", r + "attn.proj.weight", mapping.Linear(n_in=2)),
        E(f + "attn/proj_bias", r + "attn.proj.bias", mapping.Identity()),
    ]
    for proj in ("gate", "up", "down"):
        entries.append(E(f"{f}mlp/{proj}/kernel", f"{r}mlp.{proj}_proj.weight", mapping.Linear()))
        entries.append(E(f"{f}mlp/{proj}/bias", f"{r}mlp.{proj}_proj.bias", mapping.Identity()))
    m, rm = f"{flax_prefix}merger/", f"{ref_prefix}merger."
    entries += [
        E(m + "norm/scale", rm + "ln_q.weight", mapping.Identity()),
        E(m + "fc1/kernel", rm + "mlp.0.weight", mapping.Linear()),
        E(m + "fc1/bias", rm + "mlp.0.bias", mapping.Identity()),
        E(m + "fc2/kernel", rm + "mlp.2.weight", mapping.Linear()),
        E(m + "fc2/bias", rm + "mlp.2.bias", mapping.Identity()),
    ]
    return entries


# transformers >= 5 in-memory prefix -> on-disk prefix
_V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_name(name: str) -> str:
    """The on-disk (published / save_pretrained) name of a Qwen2.5-VL tensor name in either layout."""
    for v5, disk in _V5_PREFIXES:
        if name.startswith(v5):
            return disk + name[len(v5) :]
    return name


class CanonicalNames(Mapping):
    """A read-only view of a tensor mapping under on-disk names, whichever layout it was saved in."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self._tensors = tensors
        self._names: dict[str, str] = {}
        clashes = []
        for name in tensors:
            canon = canonical_name(name)
            if canon in self._names:
                clashes.append(f"{self._names[canon]} / {name}")
            self._names[canon] = name
        if clashes:
            raise CheckpointError(f"{source}: tensors present under both name layouts: " + ", ".join(clashes[:20]))

    def __getitem__(self, name):
        return self._tensors[self._names[name]]

    def shape(self, name) -> tuple[int, ...]:
        actual = self._names[name]
        t = self._tensors
        return tuple(t.shape(actual) if hasattr(t, "shape") else np.shape(t[actual]))

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _load(path, make_model, entries, ignore_prefixes, mesh, rules):
    tensors = CanonicalNames(TensorDirectory(path), path)
    mesh = mesh or sharding.single_device_mesh()
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract = nnx.get_abstract_model(make_model, mesh)
        state = hf.load_params(abstract, entries, tensors, source=path, ignore_prefixes=ignore_prefixes)
        return nnx.merge(graphdef, state)


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
    cfg = vision_config_from_hf(hf.read_config(path), dtype=dtype, param_dtype=param_dtype, **config_overrides)
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
    config = hf.read_config(path)
    dec_cfg = hf.decoder_config_from_hf(config, dtype=dtype, param_dtype=param_dtype, **decoder_overrides)
    vis_cfg = vision_config_from_hf(config, dtype=dtype, param_dtype=param_dtype, **dict(vision_overrides or {}))
    image_token_id = int(config.get("image_token_id", QWEN_IMAGE_TOKEN_ID))
    entries = mapping.decoder_entries(dec_cfg.tie_embeddings, flax_prefix="decoder/") + vision_entries(
        vis_cfg, flax_prefix="tower/"
    )
    return _load(
        path,
        lambda: vlm.VisionLanguageModel(vis_cfg, dec_cfg, image_token_id=image_token_id, rngs=nnx.Rngs(0)),
        entries,
        ("lm_head.",) if dec_cfg.tie_embeddings else (),  # a tied checkpoint may still carry a copy
        mesh,
        rules,
    )
