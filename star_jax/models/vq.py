"""STAR-VQ: a LlamaGen-style VQGAN (encoder, quantizer, decoder) in Flax NNX, any size.

Architecture (STAR_SPEC section 2): conv_in -> per resolution level `num_res_blocks` ResnetBlocks
(+ multi-head attention blocks at the lowest resolution) and an asymmetric-padding stride-2
Downsample -> mid (res, attn, res) -> GroupNorm, swish, conv_out (z_channels) -> quant_conv
(codebook_dim) -> vector quantizer -> post_quant_conv -> decoder (mirror image, `num_res_blocks + 1`
blocks per level, lowest resolution first, nearest x2 Upsample) -> 3 channels. `patch_size` p > 1
(not in the reference) folds p x p pixels into channels before conv_in and unfolds them after
conv_out, so the convs run at 1/p of the resolution: the shapes world's VQ uses p = 8.

Layout is NHWC throughout; images are [B, H, W, 3] in [-1, 1]. Module attribute names follow the
reference state dict (`encoder.conv_blocks.{l}.res.{j}.conv1`, ...), so the converter's table
is a handful of patterns (star_jax/convert/vq_table.py). Convs keep a Flax kernel
[kh, kw, in, out]; every param goes through `layers.param` with logical axis names
(`conv_kernel`, `conv_in`, `conv_out`, `embed`, `heads`, `norm`, `codebook`, `codebook_dim`).
Convs and attention run in the compute dtype with float32 accumulation; GroupNorm, softmax and
the quantizer run in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from star_jax import layers
from star_jax.config_dataclass import dataclass_from_dict
from star_jax.configs import sizes
from star_jax.models.quantizer import QuantizerOutput, VectorQuantizer
from star_jax.models.qwen2 import to_dtype
from star_jax.sharding import constrain

ACT = ("batch", None, None, None)  # NHWC activations: batch-sharded only


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Sizes (the size table's `vq` block) and quantizer / execution options of a STAR-VQ.

    Defaults are the reference STAR-VQ (1.057 B parameters, 384 px -> 24 x 24 codes).
    """

    image_size: int = 384
    in_channels: int = 3
    patch_size: int = 1  # > 1: pixel-unshuffle stem / pixel-shuffle head (star_jax extension; reference 1)
    # True: each code is a function of its own patch alone (star_jax extension; reference False).
    local_encoder: bool = False
    local_context: int = 0  # local encoder: neighbouring codes per side its conv_in sees (kernel 2c + 1)
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 8)
    z_channels: int = 512
    num_res_blocks: int = 2  # encoder; the decoder has num_res_blocks + 1 per level
    attn_heads: int = 8
    norm_groups: int = 32
    codebook_size: int = 65536
    codebook_dim: int = 512
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # quantizer
    beta: float = 0.25  # commitment weight
    l2_norm: bool = False
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    chunk_size: int | None = 16384  # codes per distance block in the nearest-code search; None = all
    usage_window: int | None = None  # codebook_used entries; None = codebook_size + 1 (reference: 65,537)
    # execution
    dtype: str = "float32"  # compute dtype of convs / attention
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each res / attention block in the backward pass

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        to_dtype(self.dtype), to_dtype(self.param_dtype)
        for c in sorted({self.ch * m for m in self.ch_mult}):
            if c % self.norm_groups:
                raise ValueError(f"vq norm_groups={self.norm_groups} must divide every level's channels; {c} is not")
        top = self.ch * self.ch_mult[-1]
        if top % self.attn_heads:
            raise ValueError(f"vq attn_heads={self.attn_heads} must divide the attention channels {top}")
        if self.patch_size < 1:
            raise ValueError(f"vq patch_size={self.patch_size} must be >= 1")
        if self.local_encoder and len(self.ch_mult) != 1:
            raise ValueError(
                f"vq local_encoder=True needs one conv level (ch_mult of length 1, the patch does the "
                f"downsampling); got ch_mult={self.ch_mult}"
            )
        if self.local_context < 0 or (self.local_context and not self.local_encoder):
            raise ValueError(f"vq local_context={self.local_context} must be >= 0 and needs local_encoder=True")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"vq image_size={self.image_size} must be divisible by {self.downsample_factor}")
        chunk = self.chunk_size
        if chunk is not None and chunk < self.codebook_size and self.codebook_size % chunk:
            raise ValueError(f"vq chunk_size={chunk} must divide codebook_size={self.codebook_size}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code side: patch_size * 2^(levels - 1) (16 at the reference)."""
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Codes per side for `image_size` images (384 / 16 = 24 at the reference)."""
        return self.image_size // self.downsample_factor

    @property
    def usage_window_size(self) -> int:
        return self.usage_window or self.codebook_size + 1

    @classmethod
    def from_dict(cls, d, **overrides) -> VQConfig:
        """From a (ConfigDict or plain) mapping, e.g. a size-table `vq` block; unknown keys raise."""
        return dataclass_from_dict(cls, d, "vq", **overrides)

    @classmethod
    def from_size(cls, size: str, **overrides) -> VQConfig:
        """The `vq` block of size `size` in configs/sizes.py, with overrides."""
        return cls.from_dict(sizes.get_size(size)["vq"], **overrides)


def grid_size(block) -> int:
    """Codes per image side of a config's `vq` block (ConfigDict or mapping), without building a VQConfig:
    image_size / (patch_size * 2^(len(ch_mult) - 1))."""
    get = block.get if hasattr(block, "get") else lambda k, d=None: getattr(block, k, d)
    return get("image_size") // (get("patch_size", 1) * 2 ** (len(get("ch_mult")) - 1))


def pixel_unshuffle(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, C*p*p], channel order (c, i, j) as torch's `F.pixel_unshuffle`."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // p, w // p, c * p * p)


def pixel_shuffle(x: jax.Array, p: int) -> jax.Array:
    """Inverse of `pixel_unshuffle`: [B, h, w, C*p*p] -> [B, h*p, w*p, C] (torch's `F.pixel_shuffle`)."""
    if p == 1:
        return x
    b, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, h, w, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * p, w * p, c)


# ---------------------------------------------------------------------------------------------
# Building blocks


class Conv(nnx.Module):
    """2-D conv, NHWC. kernel [k, k, in, out] named (conv_kernel, conv_kernel, *names); bias [out].

    `padding`: 'SAME'-style symmetric k // 2 by default, or an explicit lax padding spec.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        padding=None,
        names: tuple[str | None, str | None] = ("conv_in", "conv_out"),
        cfg: VQConfig,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch's default bound
        pdt = to_dtype(cfg.param_dtype)
        self.kernel = layers.param(
            rngs, init, (kernel, kernel, in_ch, out_ch), ("conv_kernel", "conv_kernel", *names), pdt
        )
        self.bias = layers.param(rngs, nnx.initializers.zeros, (out_ch,), names[1:], pdt)
        self.stride = stride
        # A tuple, not a list: module attributes are part of the (hashable) graphdef under jit.
        self.padding = tuple(map(tuple, padding)) if padding is not None else ((kernel // 2, kernel // 2),) * 2
        self.dtype = to_dtype(cfg.dtype)

    def __call__(self, x: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, in] -> [B, H', W', out] in the compute dtype (float32 accumulation); `kernel`
        replaces the module's own (same shape) when given."""
        kernel = self.kernel[...] if kernel is None else kernel
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm in float32 over (H, W, C / groups); scale / bias [C] named `norm`.

    `spatial=False` takes the statistics over C / groups at each position alone (the local encoder).
    """

    def __init__(self, channels: int, *, cfg: VQConfig, rngs: nnx.Rngs, spatial: bool = True):
        pdt = to_dtype(cfg.param_dtype)
        self.scale = layers.param(rngs, nnx.initializers.ones, (channels,), ("norm",), pdt)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (channels,), ("norm",), pdt)
        self.groups, self.eps, self.dtype = cfg.norm_groups, cfg.norm_eps, to_dtype(cfg.dtype)
        self.axes = (1, 2, 4) if spatial else (4,)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C] in the compute dtype."""
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=self.axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=self.axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nnx.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> dropout -> conv3x3, + (1x1 nin_shortcut) x.

    `local=True`: 1x1 convs and per-position norms, so each position sees only itself.
    """

    def __init__(self, in_ch: int, out_ch: int, *, cfg: VQConfig, rngs: nnx.Rngs, local: bool = False):
        k = 1 if local else 3
        self.norm1 = GroupNorm(in_ch, cfg=cfg, rngs=rngs, spatial=not local)
        self.conv1 = Conv(in_ch, out_ch, k, cfg=cfg, rngs=rngs)
        self.norm2 = GroupNorm(out_ch, cfg=cfg, rngs=rngs, spatial=not local)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.conv2 = Conv(out_ch, out_ch, k, cfg=cfg, rngs=rngs)
        self.nin_shortcut = Conv(in_ch, out_ch, 1, cfg=cfg, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [B, H, W, in] -> [B, H, W, out]; dropout only when `rngs` is given."""
        h = self.conv1(swish(self.norm1(x)))
        h = self.dropout(swish(self.norm2(h)), deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return constrain(x + h, ACT)


class AttnBlock(nnx.Module):
    """Multi-head self-attention over all H*W positions; 1x1 convs q, k, v, proj_out; residual.

    Scale (C / heads)^-0.5; q/k/v kernels are (embed -> heads), proj_out (heads -> embed).
    """

    def __init__(self, channels: int, *, cfg: VQConfig, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, cfg=cfg, rngs=rngs)
        self.q = Conv(channels, channels, 1, names=("embed", "heads"), cfg=cfg, rngs=rngs)
        self.k = Conv(channels, channels, 1, names=("embed", "heads"), cfg=cfg, rngs=rngs)
        self.v = Conv(channels, channels, 1, names=("embed", "heads"), cfg=cfg, rngs=rngs)
        self.proj_out = Conv(channels, channels, 1, names=("heads", "embed"), cfg=cfg, rngs=rngs)
        self.heads, self.dtype = cfg.attn_heads, to_dtype(cfg.dtype)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        hn = self.norm(x)
        split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
        q, k, v = split(self.q(hn)), split(self.k(hn)), split(self.v(hn))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (c // self.heads) ** -0.5, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(self.dtype)
        return constrain(x + self.proj_out(out.reshape(b, h, w, c)), ACT)


class Downsample(nnx.Module):
    """Pad right and bottom by 1, then conv3x3 stride 2, padding 0: [B, H, W, C] -> [B, H/2, W/2, C]."""

    def __init__(self, channels: int, *, cfg: VQConfig, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, stride=2, padding=[(0, 1), (0, 1)], cfg=cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest x2, then conv3x3: [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, channels: int, *, cfg: VQConfig, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, cfg=cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ConvBlock(nnx.Module):
    """One resolution level: `res` blocks (each followed by `attn` when present), then resampling."""

    def __init__(
        self, in_ch: int, out_ch: int, n: int, *, attn: bool, resample, cfg: VQConfig, rngs: nnx.Rngs, local=False
    ):
        self.res = nnx.List(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, cfg=cfg, rngs=rngs, local=local) for j in range(n)]
        )
        self.attn = nnx.List([AttnBlock(out_ch, cfg=cfg, rngs=rngs) for _ in range(n)] if attn else [])
        if resample == "down":
            self.downsample = Downsample(out_ch, cfg=cfg, rngs=rngs)
        elif resample == "up":
            self.upsample = Upsample(out_ch, cfg=cfg, rngs=rngs)
        self.resample = resample

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None, remat: bool) -> jax.Array:
        for j, res in enumerate(self.res):
            x = _run(res, x, rngs, remat)
            if len(self.attn):
                x = _run(self.attn[j], x, rngs, remat)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


def _run(block: nnx.Module, x: jax.Array, rngs: nnx.Rngs | None, remat: bool) -> jax.Array:
    if remat:
        return nnx.remat(lambda m, y, r: m(y, r))(block, x, rngs)
    return block(x, rngs)


def _mid(channels: int, cfg: VQConfig, rngs: nnx.Rngs, local: bool = False) -> nnx.List:
    """res, attn, res; a local encoder's mid block has no attention (res, res)."""
    res = lambda: ResnetBlock(channels, channels, cfg=cfg, rngs=rngs, local=local)
    return nnx.List([res(), res()] if local else [res(), AttnBlock(channels, cfg=cfg, rngs=rngs), res()])


class Encoder(nnx.Module):
    """images [B, H, W, in_channels] -> z [B, H/f, W/f, z_channels] (f = patch_size * 2^(levels-1)).

    With patch_size p > 1, conv_in reads p x p pixel-unshuffled patches (in_channels * p^2 channels).
    `local_encoder`: 1x1 convs, per-position norms and no attention, so a code depends on its own
    patch alone (and `local_context` neighbours per side, through conv_in): equal neighbourhoods get
    equal codes, which the stack can learn to predict (with the default encoder, context spreads a
    flat background over hundreds of interchangeable codes).
    """

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        chans = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chans) - 1
        local = cfg.local_encoder
        k = 1 if local else 3
        self.patch_size = cfg.patch_size
        k_in = 2 * cfg.local_context + 1 if local else 3
        self.conv_in = Conv(cfg.in_channels * cfg.patch_size**2, cfg.ch, k_in, cfg=cfg, rngs=rngs)
        blocks, block_in = [], cfg.ch
        for level, out_ch in enumerate(chans):
            resample = "down" if level != last else None
            blocks.append(
                ConvBlock(
                    block_in,
                    out_ch,
                    cfg.num_res_blocks,
                    attn=level == last and not local,
                    resample=resample,
                    cfg=cfg,
                    rngs=rngs,
                    local=local,
                )
            )
            block_in = out_ch
        self.conv_blocks = nnx.List(blocks)
        self.mid = _mid(block_in, cfg, rngs, local)
        self.norm_out = GroupNorm(block_in, cfg=cfg, rngs=rngs, spatial=not local)
        self.conv_out = Conv(block_in, cfg.z_channels, k, cfg=cfg, rngs=rngs)
        self.remat = cfg.remat

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [B, H, W, C] float in [-1, 1] -> [B, H/f, W/f, z_channels] compute dtype."""
        h = constrain(self.conv_in(pixel_unshuffle(x, self.patch_size)), ACT)
        for block in self.conv_blocks:
            h = block(h, rngs, self.remat)
        for block in self.mid:
            h = _run(block, h, rngs, self.remat)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """z [B, h, w, z_channels] -> images [B, h*f, w*f, in_channels]; levels run lowest resolution first.

    With patch_size p > 1, conv_out writes in_channels * p^2 channels that a pixel shuffle unfolds.
    """

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        chans = [cfg.ch * m for m in cfg.ch_mult][::-1]
        last = len(chans) - 1
        block_in = chans[0]
        self.conv_in = Conv(cfg.z_channels, block_in, cfg=cfg, rngs=rngs)
        self.mid = _mid(block_in, cfg, rngs)
        blocks = []
        for level, out_ch in enumerate(chans):
            resample = "up" if level != last else None
            blocks.append(
                ConvBlock(
                    block_in, out_ch, cfg.num_res_blocks + 1, attn=level == 0, resample=resample, cfg=cfg, rngs=rngs
                )
            )
            block_in = out_ch
        self.conv_blocks = nnx.List(blocks)
        self.norm_out = GroupNorm(block_in, cfg=cfg, rngs=rngs)
        # 3 output channels do not divide a sharded axis: that dimension stays replicated.
        out_ch = cfg.in_channels * cfg.patch_size**2
        self.conv_out = Conv(block_in, out_ch, names=("conv_in", None), cfg=cfg, rngs=rngs)
        self.patch_size, self.remat = cfg.patch_size, cfg.remat

    def features(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """z [B, h, w, z_channels] -> the last level's features [B, h*f/p, w*f/p, ch] (input of `head`)."""
        h = constrain(self.conv_in(z), ACT)
        for block in self.mid:
            h = _run(block, h, rngs, self.remat)
        for block in self.conv_blocks:
            h = block(h, rngs, self.remat)
        return h

    def head(self, h: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """GroupNorm, swish, conv_out (its kernel, or `kernel` [3, 3, ch, C*p*p] in its place), pixel shuffle.

        Taking the kernel as an argument lets a loss differentiate with respect to the last layer
        alone (the adaptive GAN weight) without a second pass through the decoder.
        """
        return pixel_shuffle(self.conv_out(swish(self.norm_out(h)), kernel), self.patch_size)

    def __call__(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """z [B, h, w, z_channels] -> [B, h*f, w*f, C] compute dtype (images in about [-1, 1])."""
        return self.head(self.features(z, rngs))


class VQModel(nnx.Module):
    """The STAR-VQ tokenizer: `encoder`, `quant_conv`, `quantize`, `post_quant_conv`, `decoder`."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quantize = VectorQuantizer(cfg, rngs=rngs)
        self.quant_conv = Conv(cfg.z_channels, cfg.codebook_dim, 1, cfg=cfg, rngs=rngs)
        self.post_quant_conv = Conv(cfg.codebook_dim, cfg.z_channels, 1, cfg=cfg, rngs=rngs)
        self.cfg = cfg

    def encode_continuous(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """images [B, H, W, 3] float32 in [-1, 1] -> pre-quantisation z [B, H/f, W/f, codebook_dim] float32."""
        return self.quant_conv(self.encoder(images, rngs)).astype(jnp.float32)

    def encode(self, images: jax.Array, *, update_usage: bool = False, rngs: nnx.Rngs | None = None) -> QuantizerOutput:
        """images [B, H, W, 3] float32 in [-1, 1] -> QuantizerOutput (z_q [B, h, w, D] f32, indices [B, h, w] int32, losses)."""
        return self.quantize(self.encode_continuous(images, rngs), update_usage=update_usage)

    def encode_to_codes(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] float32 in [-1, 1] -> codes [B, H/f, W/f] int32 (raster order when flattened)."""
        return self.encode(images).indices

    def decode(self, z_q: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Quantised vectors z_q [B, h, w, codebook_dim] -> images [B, h*f, w*f, 3] float32 (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z_q), rngs).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """codes [B, h, w] int -> images [B, h*f, w*f, 3] float32."""
        return self.decode(self.quantize.lookup(codes))

    def __call__(
        self, images: jax.Array, *, update_usage: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction [B, H, W, 3] float32 and the QuantizerOutput (losses, indices) of images [B, H, W, 3]."""
        q = self.encode(images, update_usage=update_usage, rngs=rngs)
        return self.decode(q.z_q, rngs), q


def param_counts(state) -> dict[str, int]:
    """Parameter counts by top-level part (`encoder`, `decoder`, `quantize`, ...) and `total`, of an nnx
    state (abstract or concrete); the `codebook_used` buffer is not a parameter."""
    counts: dict[str, int] = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            continue
        n = math.prod(var.get_value().shape)
        counts[str(path[0])] = counts.get(str(path[0]), 0) + n
    counts["total"] = sum(counts.values())
    return counts
