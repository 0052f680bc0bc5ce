"""Analytic FLOP counts (matmul FLOPs, 2 per multiply-add) for MFU and benchmark reporting."""

from __future__ import annotations

from star_jax.models.qwen2 import DecoderConfig


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
