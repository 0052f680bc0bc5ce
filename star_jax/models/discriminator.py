"""PatchGAN discriminator for VQ training (the taming / LlamaGen `NLayerDiscriminator` layout).

conv4x4 s2 -> LeakyReLU(0.2) -> [conv4x4 s2 -> norm -> LeakyReLU] x (n_layers - 1) -> conv4x4 s1 ->
norm -> LeakyReLU -> conv4x4 s1 -> one logit per patch. The reference uses BatchNorm; star_jax uses
GroupNorm (or none) so the discriminator is stateless and its output for one image does not
depend on the rest of the (sharded) batch. Params carry the same logical names as the VQ convs.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from star_jax.models.vq import Conv, GroupNorm


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN sizes: `ndf` base channels, `n_layers` stride-2 convs (3 -> 30 x 30 logits at 256 px)."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"  # "group" or "none"
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.norm not in ("group", "none"):
            raise ValueError(f"discriminator norm={self.norm!r} must be 'group' or 'none'")
        if self.n_layers < 1:
            raise ValueError(f"discriminator n_layers={self.n_layers} must be >= 1")
        if self.norm == "group" and self.ndf % self.norm_groups:
            raise ValueError(f"discriminator norm_groups={self.norm_groups} must divide ndf={self.ndf}")


class PatchGANDiscriminator(nnx.Module):
    """images [B, H, W, C] in [-1, 1] -> patch logits [B, H', W', 1] float32."""

    def __init__(self, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
        pad = [(1, 1), (1, 1)]
        chans = [cfg.ndf * min(2**i, 8) for i in range(cfg.n_layers + 1)]
        self.conv_in = Conv(cfg.in_channels, chans[0], 4, stride=2, padding=pad, cfg=cfg, rngs=rngs)
        convs, norms = [], []
        for i in range(1, cfg.n_layers + 1):
            stride = 2 if i < cfg.n_layers else 1
            convs.append(Conv(chans[i - 1], chans[i], 4, stride=stride, padding=pad, cfg=cfg, rngs=rngs))
            norms.append(GroupNorm(chans[i], cfg=cfg, rngs=rngs) if cfg.norm == "group" else None)
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = Conv(chans[-1], 1, 4, padding=pad, names=("conv_in", None), cfg=cfg, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] float -> logits [B, H / 2^(n-1) - 2, ..., 1] float32 (30 x 30 at 256 px, n 3)."""
        h = jax.nn.leaky_relu(self.conv_in(images), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = jax.nn.leaky_relu(norm(h) if norm is not None else h, 0.2)
        return self.conv_out(h).astype("float32")
