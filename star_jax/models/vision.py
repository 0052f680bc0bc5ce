"""The Qwen2.5-VL vision tower in Flax NNX (STAR's frozen ViT), any size.

Pipeline on one packed sequence of patches from all images: patch embedding (a Conv3d whose stride
equals its kernel, i.e. a linear map of each flattened [C, T, P, P] patch), reordering into
attention windows, `depth` pre-norm blocks (RMSNorm, attention with 2-D rotary embeddings, SwiGLU
MLP with biases) that attend within a window, or within the whole image at the blocks listed in
`fullatt_block_indexes`, then the patch merger (RMSNorm, m x m neighbouring patches concatenated,
MLP with exact GELU) into the LLM width, and the inverse window permutation.

Grid sizes are data: everything that depends on `grid_thw` (window permutation, rotary positions,
attention segments) is computed in numpy by `vision_layout` into a `VisionLayout` of arrays whose
shapes depend only on the number of patches. `VisionTower.__call__(pixel_values, grid_thw)` needs a
concrete grid (make it static under jit); `VisionTower.encode(pixel_values, layout)` takes the
layout as traced arrays, so one compilation serves every image set with the same patch count.
When the layout is concrete and every frame has the same grid (a batch of equal-size images),
attention runs per frame ([frames, L, L] scores) instead of over one masked [N, N] block: for a
batch of 32 shapes-world images that is 32x fewer score entries.
Block params are stacked on a leading `layers` axis and run under `lax.scan` or a Python loop.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import layers
from star_jax.config_dataclass import dataclass_from_dict
from star_jax.models.qwen2 import DTYPES, REMAT_POLICIES, to_dtype
from star_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Sizes of a Qwen2.5-VL vision tower (the size table's `vision` block) and execution options."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels per attention-window side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be divisible by 4 (2-D rotary embedding)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"vision fullatt_block_indexes={self.fullatt_block_indexes}: {bad} not in [0, {self.depth})"
            )
        if self.window_units < 1:
            raise ValueError(
                f"vision window_size={self.window_size} is smaller than patch_size * spatial_merge_size = "
                f"{self.patch_size * self.spatial_merge_size}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"vision remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"vision {field}={getattr(self, field)!r} is not one of {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: in_channels * temporal_patch_size * patch_size**2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Attention-window side in merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, d, **overrides) -> VisionConfig:
        """From a (ConfigDict or plain) mapping; unknown keys raise naming the key."""
        return dataclass_from_dict(cls, d, "vision", **overrides)


# ---------------------------------------------------------------------------------------------
# Data-dependent layout (numpy, from a concrete grid_thw)


class VisionLayout(NamedTuple):
    """Everything the tower needs from `grid_thw`, as arrays whose shapes depend only on N patches.

    window_index: [N / m^2] int32, merged-patch order inside the blocks (HF `window_index`).
    reverse_index: [N / m^2] int32, its inverse (restores the processor's order after the merger).
    rope_hw: [N, 2] int32, (row, column) patch position of each token, in window order.
    window_ids: [N] int32, attention window of each token (window blocks), in window order.
    frame_ids: [N] int32, image / frame of each token (full-attention blocks), in window order.
    """

    window_index: np.ndarray
    reverse_index: np.ndarray
    rope_hw: np.ndarray
    window_ids: np.ndarray
    frame_ids: np.ndarray


def vision_layout(grid_thw, cfg: VisionConfig) -> VisionLayout:
    """The `VisionLayout` of images with patch grids `grid_thw` [num_images, 3] (numpy, host side)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, unit, ws = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_units
    window_index, window_sizes, hw, frames = [], [], [], []
    offset = frame = 0
    for t, h, w in grid.tolist():
        if min(t, h, w) < 1 or h % m or w % m:
            raise ValueError(f"grid_thw row {(t, h, w)}: h and w must be positive multiples of spatial_merge_size={m}")
        lh, lw = h // m, w // m
        nh, nw = -(-lh // ws), -(-lw // ws)
        padded = np.full((t, nh * ws, nw * ws), -1, np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        sizes = (padded >= 0).sum(-1)
        window_index.append(padded[padded >= 0] + offset)
        window_sizes.append(sizes[sizes > 0])
        # Processor order: rows of m x m blocks; each block's m * m patches consecutive.
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block_major = np.stack([rows, cols], -1).reshape(lh, m, lw, m, 2).transpose(0, 2, 1, 3, 4).reshape(-1, 2)
        hw.append(np.tile(block_major, (t, 1)))
        frames.append(np.repeat(frame + np.arange(t), h * w))
        offset += t * lh * lw
        frame += t
    window_index = np.concatenate(window_index)
    token_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    sizes = np.concatenate(window_sizes) * unit
    return VisionLayout(
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index).astype(np.int32),
        rope_hw=np.concatenate(hw)[token_order].astype(np.int32),
        window_ids=np.repeat(np.arange(len(sizes)), sizes).astype(np.int32),
        frame_ids=np.concatenate(frames)[token_order].astype(np.int32),
    )


def vit_layout(cfg: VisionConfig, image_size: int, rows: int) -> VisionLayout:
    """The static `VisionLayout` of `rows` square images of `image_size` pixels (one per batch row)."""
    side = image_size // cfg.patch_size
    return vision_layout(np.tile([[1, side, side]], (rows, 1)), cfg)


def rope_tables(rope_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim] float32 of the 2-D rotary embedding for (row, col) positions [N, 2].

    head_dim / 4 frequencies rotate by the row, the next head_dim / 4 by the column; the
    [row, col] halves are repeated twice (rotate-half layout, as HF).
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = rope_hw.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)  # [N, 2, head_dim / 4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [N, head_dim / 2]: rows then cols
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [N, H, hd] rotated by cos/sin [N, hd] in float32 (rotate-half), cast back."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = x32 * cos[:, None] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, None]
    return out.astype(x.dtype)


def _uniform_frame_length(layout: VisionLayout) -> int | None:
    """Tokens per frame L if the layout is concrete and every frame has the same length and windows, else None."""
    if any(isinstance(a, jax.core.Tracer) for a in layout):
        return None
    frame_ids, window_ids = np.asarray(layout.frame_ids), np.asarray(layout.window_ids)
    frames = int(frame_ids.max()) + 1
    if frames == 1 or frame_ids.size % frames:
        return None
    length = frame_ids.size // frames
    windows = window_ids.reshape(frames, length)
    if not (
        np.array_equal(frame_ids, np.repeat(np.arange(frames), length))
        and (windows - windows[:, :1] == windows[:1] - windows[0, 0]).all()
    ):
        return None
    return length


# ---------------------------------------------------------------------------------------------
# Modules


class VisionAttention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (bias), 2-D RoPE and an output bias."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        pdt = to_dtype(cfg.param_dtype)
        zeros = nnx.initializers.zeros
        self.qkv_kernel = layers.param(
            rngs, nnx.initializers.normal(d**-0.5), (d, 3, h, hd), ("embed", None, "heads", "head_dim"), pdt
        )
        self.qkv_bias = layers.param(rngs, zeros, (3, h, hd), (None, "heads", "head_dim"), pdt)
        self.proj_kernel = layers.param(
            rngs, nnx.initializers.normal(d**-0.5), (h, hd, d), ("heads", "head_dim", "embed"), pdt
        )
        self.proj_bias = layers.param(rngs, zeros, (d,), ("embed",), pdt)
        self.cfg = cfg

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [N, D]; cos/sin [N, head_dim]; mask [L, L] bool (True = attend) -> [N, D].

        The N tokens are N / L independent blocks of L (one per image when all grids are equal,
        else one block of N); `mask` applies inside every block.
        """
        dt = to_dtype(self.cfg.dtype)
        n, length = x.shape[0], mask.shape[0]
        qkv = layers.dot("nd,dshk->snhk", x, self.qkv_kernel[...], dt, out_dtype=jnp.float32)
        qkv = (qkv + self.qkv_bias[...].astype(jnp.float32)[:, None]).astype(dt)
        q, k, v = _apply_rope(qkv[0], cos, sin), _apply_rope(qkv[1], cos, sin), qkv[2]
        q, k, v = (a.reshape(n // length, length, *a.shape[1:]) for a in (q, k, v))
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [blocks, heads, L, head_dim]
        out = layers.attention(
            q, k, v, mask, dt, scale=self.cfg.head_dim**-0.5, score_spec="bhqk,bhsk->bhqs", value_spec="bhqs,bhsk->bhqk"
        )
        out = out.transpose(0, 2, 1, 3)
        y = layers.dot("bqhk,hkd->bqd", out, self.proj_kernel[...], dt, out_dtype=jnp.float32)
        return (y.reshape(n, -1) + self.proj_bias[...].astype(jnp.float32)).astype(dt)


class VisionMLP(nnx.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.gate = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, D] -> [N, D]."""
        return self.down(constrain(layers.swiglu(self.gate(x), self.up(x)), ("batch", "act_mlp")))


class VisionBlock(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.rms_eps, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.norm1 = layers.RMSNorm(cfg.hidden_size, **kw)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = layers.RMSNorm(cfg.hidden_size, **kw)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        """x [N, D] -> [N, D]."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each m x m group of consecutive patches concatenated -> Linear, GELU, Linear."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        dt, pdt = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        width = cfg.hidden_size * cfg.merge_unit
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.fc1 = layers.Dense(width, width, ("embed", "mlp"), **kw)
        self.fc2 = layers.Dense(width, cfg.out_hidden_size, ("mlp", "embed"), **kw)
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, D] -> [N / m^2, out_hidden_size]."""
        x = self.norm(x).reshape(-1, self.width)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """Patch embedding -> window / full attention blocks -> patch merger (Qwen2.5-VL ViT)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        pdt = to_dtype(cfg.param_dtype)
        init = nnx.initializers.normal(stddev=cfg.patch_dim**-0.5)
        self.patch_kernel = layers.param(rngs, init, (cfg.patch_dim, cfg.hidden_size), ("patch", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return VisionBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        """Image embeddings for the language model.

        Args:
          pixel_values: [N, in_channels * temporal_patch_size * patch_size**2] float (the
            preprocessor's output, all images concatenated).
          grid_thw: [num_images, 3] int, concrete (numpy / list / tuple; static under jit).
        Returns:
          [N / spatial_merge_size**2, out_hidden_size] compute dtype, images in order.
        """
        if isinstance(grid_thw, jax.core.Tracer):
            raise TypeError(
                "VisionTower: grid_thw must be concrete (pass it as a static argument, or call "
                "encode(pixel_values, vision_layout(grid_thw, cfg)) with the layout traced)"
            )
        return self.encode(pixel_values, vision_layout(grid_thw, self.cfg))

    def encode(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """As `__call__`, with the grid given as a `VisionLayout` (numpy or traced arrays)."""
        cfg = self.cfg
        n = pixel_values.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim or layout.rope_hw.shape[0] != n:
            raise ValueError(
                f"pixel_values shape {pixel_values.shape}: expected [{layout.rope_hw.shape[0]}, {cfg.patch_dim}] "
                "(patches of grid_thw x in_channels * temporal_patch_size * patch_size**2)"
            )
        dt = to_dtype(cfg.dtype)
        x = layers.matmul(pixel_values, self.patch_kernel[...], dt)  # [N, D]
        x = x.reshape(n // cfg.merge_unit, cfg.merge_unit, -1)[jnp.asarray(layout.window_index)].reshape(n, -1)
        # The flat tokens of all images are spread over the batch axes (whole images per device when
        # they divide): without it every device would run the ViT over the global batch.
        x = constrain(x, ("batch", "act_embed"))
        cos, sin = rope_tables(jnp.asarray(layout.rope_hw), cfg.head_dim, cfg.rope_theta)
        window_ids, frame_ids = layout.window_ids, layout.frame_ids
        length = _uniform_frame_length(layout)
        if length is not None:  # equal frames: attention per frame, [N/L, L, L] scores instead of [N, N]
            window_ids, frame_ids = window_ids[:length], frame_ids[:length]
        window_ids, frame_ids = jnp.asarray(window_ids), jnp.asarray(frame_ids)
        window_mask = window_ids[:, None] == window_ids[None, :]
        full_mask = frame_ids[:, None] == frame_ids[None, :]
        is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

        graphdef, state = nnx.split(self.blocks)

        def body(h, xs):
            block_state, full = xs
            mask = jnp.where(full, full_mask, window_mask)
            return nnx.merge(graphdef, block_state)(h, cos, sin, mask), None

        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (state, is_full))
        else:
            for i in range(cfg.depth):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], (state, is_full)))
        return self.merger(x)[jnp.asarray(layout.reverse_index)]
