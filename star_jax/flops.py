"""Analytic FLOP counts (matmul FLOPs, 2 per multiply-add) for MFU, benchmarks and scaling laws.

Two families:
- `layer_flops` / `decoder_forward_flops` / `train_step_flops`: the useful forward work of a
  decoder (causal attention over (seq + 1) / 2 keys on average), for MFU and the benchmarks.
- `*_pass_flops`, `vq_encoder_flops`, `vision_forward_flops`: what a training step computes, part
  by part, for the scaling-law compute axis. A part runs in one of three modes (`MODES`):
    forward     frozen, nothing trainable feeds it (the VQ encoder, the ViT of an edit): forward only;
    backprop    frozen, but gradients flow through it to a trainable part upstream (STAR's base,
                which carries the adapter's image embeddings to the stack): the backward computes
                the gradients w.r.t. activations and no weight gradients, so a matmul costs 2x its
                forward and attention (dQ, dK from dS; dP, dV from dO) 3x;
    train       trainable: forward + activation and weight gradients, 3x.
  Attention is counted as computed: the dense [T, T] scores of the implementation (masked
  entries are computed too), which is what XLA's `cost_analysis` counts.
"""

from __future__ import annotations

from star_jax.models.qwen2 import DecoderConfig

# mode -> (multiplier of weight matmuls, multiplier of attention score / value matmuls)
MODES = {"forward": (1.0, 1.0), "backprop": (2.0, 3.0), "train": (3.0, 3.0)}


def layer_flops(cfg: DecoderConfig, tokens: int, context: float) -> float:
    """Forward FLOPs of one decoder layer for `tokens` queries attending to `context` keys on average."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    proj = d * (h + 2 * kv) * hd + h * hd * d
    mlp = 3 * d * f
    attn = 2 * h * hd * context  # q.k and p.v per query
    return 2.0 * tokens * (proj + mlp + attn)


def decoder_forward_flops(
    cfg: DecoderConfig, batch: int, seq: int, *, num_layers: int | None = None, head: bool = True
) -> float:
    """Forward FLOPs of a causal pass over [batch, seq] tokens (attention over (seq + 1) / 2 keys
    on average, as causal masking makes useful)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    total = layers * layer_flops(cfg, batch * seq, (seq + 1) / 2)
    if head:
        total += 2.0 * batch * seq * cfg.hidden_size * cfg.vocab_size
    return total


def train_step_flops(forward: float) -> float:
    """A training step costs about 3x its forward pass (backward = 2x forward)."""
    return 3.0 * forward


def _mult(mode: str) -> tuple[float, float]:
    if mode not in MODES:
        raise ValueError(f"FLOP mode {mode!r} is not one of {sorted(MODES)}")
    return MODES[mode]


def decoder_pass_flops(cfg: DecoderConfig, seq: int, num_layers: int, mode: str) -> float:
    """Training-step FLOPs of `num_layers` decoder layers over one sequence of `seq` tokens in `mode`
    (see the module docstring): q/k/v/o and the SwiGLU MLP per token, dense [seq, seq] attention."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    weights = 2.0 * seq * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f)
    attention = 2.0 * 2 * h * hd * seq * seq
    w_mult, a_mult = _mult(mode)
    return num_layers * (w_mult * weights + a_mult * attention)


def dense_flops(tokens: int, d_in: int, d_out: int, mode: str) -> float:
    """Training-step FLOPs of a [d_in -> d_out] dense layer over `tokens` tokens in `mode`."""
    return _mult(mode)[0] * 2.0 * tokens * d_in * d_out


def vq_encoder_flops(vq: dict) -> float:
    """Forward FLOPs of the VQ encoder + quant_conv + nearest-code search for one image (`vq`: the
    config's `model.vq` block): convs at each level's resolution, the attention of the last level
    and mid block (none for a local encoder), and the [positions, codebook] distance matmul."""
    p, ch, mult = vq.get("patch_size", 1), vq["ch"], list(vq["ch_mult"])
    local, n_res = vq.get("local_encoder", False), vq["num_res_blocks"]
    k = 1 if local else 3
    k_in = 2 * vq.get("local_context", 0) + 1 if local else 3
    side = vq["image_size"] // p
    conv = lambda side, kk, c_in, c_out: 2.0 * side * side * kk * kk * c_in * c_out  # noqa: E731
    attn = lambda side, c: 4 * conv(side, 1, c, c) + 2.0 * 2 * (side * side) ** 2 * c  # noqa: E731
    total = conv(side, k_in, vq["in_channels"] * p * p, ch)
    c_in = ch
    for level, m in enumerate(mult):
        c_out = ch * m
        last = level == len(mult) - 1
        for j in range(n_res):
            c = c_in if j == 0 else c_out
            total += (
                conv(side, k, c, c_out) + conv(side, k, c_out, c_out) + (conv(side, 1, c, c_out) if c != c_out else 0)
            )
            if last and not local:
                total += attn(side, c_out)
        if not last:
            side //= 2
            total += conv(side, 3, c_out, c_out)
        c_in = c_out
    total += 2 * (conv(side, k, c_in, c_in) * 2) + (0 if local else attn(side, c_in))  # mid: res, (attn), res
    total += conv(side, k, c_in, vq["z_channels"]) + conv(side, 1, vq["z_channels"], vq["codebook_dim"])
    total += 2.0 * side * side * vq["codebook_size"] * vq["codebook_dim"]
    return total


def vision_forward_flops(vision: dict, image_size: int) -> float:
    """Forward FLOPs of the ViT on one square image of `image_size` pixels (`vision`: the config's
    `model.vision` block): patch embedding, per block q/k/v/o + SwiGLU MLP and attention over
    the window's (or, in full-attention blocks, the image's) patches, and the patch merger."""
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    d, f, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    n = (image_size // patch) ** 2
    window = min((vision["window_size"] // patch) ** 2, n)
    full = set(vision.get("fullatt_block_indexes", ()))
    total = 2.0 * n * vision["in_channels"] * vision["temporal_patch_size"] * patch * patch * d
    for i in range(depth):
        keys = n if i in full else window
        total += 2.0 * n * (4 * d * d + 3 * d * f) + 2.0 * 2 * n * keys * d
    merged, width = n // merge**2, d * merge**2
    total += 2.0 * merged * (width * width + width * vision["out_hidden_size"])
    return total
