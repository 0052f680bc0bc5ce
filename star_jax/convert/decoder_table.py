"""Mapping table of the Qwen2 / Qwen2.5 text decoder: a `qwen2.Decoder` (and any `qwen2.LayerStack`,
e.g. STAR's stacked AR) <-> the Hugging Face on-disk names (STAR_SPEC section 8)."""

from __future__ import annotations

from star_jax.convert.table import Entry, Identity, Linear, Reshape


def layer_stack_entries(flax_prefix: str, ref_prefix: str) -> list[Entry]:
    """A `qwen2.LayerStack` <-> `{ref_prefix}layers.{i}.*` and `{ref_prefix}norm.weight`."""
    f, r = f"{flax_prefix}layers/", f"{ref_prefix}layers.{{i}}."
    entries = [
        Entry(f + "input_norm/scale", r + "input_layernorm.weight", Identity()),
        Entry(f + "post_attn_norm/scale", r + "post_attention_layernorm.weight", Identity()),
        Entry(f + "mlp/gate/kernel", r + "mlp.gate_proj.weight", Linear()),
        Entry(f + "mlp/up/kernel", r + "mlp.up_proj.weight", Linear()),
        Entry(f + "mlp/down/kernel", r + "mlp.down_proj.weight", Linear()),
        Entry(f + "attn/o_kernel", r + "self_attn.o_proj.weight", Linear(n_in=2)),
    ]
    for proj in "qkv":
        entries.append(Entry(f"{f}attn/{proj}_kernel", f"{r}self_attn.{proj}_proj.weight", Linear()))
        entries.append(Entry(f"{f}attn/{proj}_bias", f"{r}self_attn.{proj}_proj.bias", Reshape()))
    entries.append(Entry(f"{flax_prefix}final_norm/scale", f"{ref_prefix}norm.weight", Identity()))
    return entries


def decoder_entries(tie_embeddings: bool, flax_prefix: str = "", ref_prefix: str = "") -> list[Entry]:
    """A `qwen2.Decoder` <-> `model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight` and,
    untied, `lm_head.weight` (names under `ref_prefix`, paths under `flax_prefix`)."""
    entries = [Entry(f"{flax_prefix}embedding", f"{ref_prefix}model.embed_tokens.weight", Identity())]
    entries += layer_stack_entries(f"{flax_prefix}stack/", f"{ref_prefix}model.")
    if not tie_embeddings:
        entries.append(Entry(f"{flax_prefix}lm_head", f"{ref_prefix}lm_head.weight", Linear()))
    return entries
