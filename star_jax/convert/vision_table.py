"""Mapping table of the Qwen2.5-VL vision tower: a `vision.VisionTower` <-> the Hugging Face
`visual.*` names (STAR_SPEC section 8), including the patch embedding's Conv3d layout."""

from __future__ import annotations

import dataclasses

import numpy as np

from star_jax.convert.table import Entry, Identity, Linear, Reshape


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


def vision_entries(cfg, flax_prefix: str = "", ref_prefix: str = "visual.") -> list[Entry]:
    """A `vision.VisionTower` of `cfg` (a `vision.VisionConfig`) <-> `{ref_prefix}patch_embed`, `blocks.{i}`, `merger`."""
    f, r = f"{flax_prefix}blocks/", f"{ref_prefix}blocks.{{i}}."
    kernel = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    entries = [
        Entry(f"{flax_prefix}patch_kernel", f"{ref_prefix}patch_embed.proj.weight", PatchConv(kernel)),
        Entry(f + "norm1/scale", r + "norm1.weight", Identity()),
        Entry(f + "norm2/scale", r + "norm2.weight", Identity()),
        Entry(f + "attn/qkv_kernel", r + "attn.qkv.weight", Linear()),
        Entry(f + "attn/qkv_bias", r + "attn.qkv.bias", Reshape()),
        Entry(f + "attn/proj_kernel", r + "attn.proj.weight", Linear(n_in=2)),
        Entry(f + "attn/proj_bias", r + "attn.proj.bias", Identity()),
    ]
    for proj in ("gate", "up", "down"):
        entries.append(Entry(f"{f}mlp/{proj}/kernel", f"{r}mlp.{proj}_proj.weight", Linear()))
        entries.append(Entry(f"{f}mlp/{proj}/bias", f"{r}mlp.{proj}_proj.bias", Identity()))
    m, rm = f"{flax_prefix}merger/", f"{ref_prefix}merger."
    entries += [
        Entry(m + "norm/scale", rm + "ln_q.weight", Identity()),
        Entry(m + "fc1/kernel", rm + "mlp.0.weight", Linear()),
        Entry(m + "fc1/bias", rm + "mlp.0.bias", Identity()),
        Entry(m + "fc2/kernel", rm + "mlp.2.weight", Linear()),
        Entry(m + "fc2/bias", rm + "mlp.2.bias", Identity()),
    ]
    return entries
