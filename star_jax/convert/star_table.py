"""Mapping table of the whole STAR model <-> the reference STAR state dict (STAR_SPEC section 8).

Its own entries are the pixel adapter and the image head; the stacked AR reuses the decoder's layer
stack table, and `star_entries` composes the decoder (`base/` <-> `llm.`), vision (`vision/` <->
`llm.visual.`), stack, adapter, head and VQ (`vq/` <-> `pixel_encoder.`) tables for the components
a model has. `star_tensors` reads a state dict saved with newer transformers names
(`llm.model.language_model.*`, `llm.model.visual.*`) under the released ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from flax import nnx

from star_jax.convert import decoder_table, hf, vision_table, vq_table
from star_jax.convert.table import Entry, Identity, Linear

# Reference prefixes of the STAR state dict, by star_jax component.
STAR_PREFIXES = {
    "base": "llm.",
    "vision": "llm.visual.",
    "stacked_ar": "stacked_ar.",
    "pixel_adapter": "pixel_adapter.",
    "image_head": "pixel_output_head.",
    "vq": vq_table.STAR_PREFIX,
}
# Prefixes of a reference state dict that star_jax has no module for.
IGNORED_PREFIXES = ("diffusion_decoder.",)
# Names transformers >= 4.52 (and 5) give the wrapped Qwen2.5-VL -> the released (4.51) names.
NEWER_PREFIXES = (
    ("llm.model.language_model.", "llm.model."),
    ("llm.model.visual.", "llm.visual."),
    ("stacked_ar.model.language_model.", "stacked_ar.model."),
)


def canonical_star_name(name: str) -> str:
    """The released (transformers 4.51) name of a STAR state-dict name in either layout: e.g.
    `llm.model.language_model.layers.0.mlp.up_proj.weight` -> `llm.model.layers.0.mlp.up_proj.weight`,
    `llm.model.visual.merger.ln_q.weight` -> `llm.visual.merger.ln_q.weight`."""
    for newer, released in NEWER_PREFIXES:
        if name.startswith(newer):
            return released + name[len(newer) :]
    return name


def star_tensors(tensors: Mapping, source: str) -> hf.CanonicalNames:
    """A STAR state dict (any mapping of names) under the released names (`canonical_star_name`);
    CheckpointError naming the tensors a file holds under both layouts."""
    return hf.CanonicalNames(tensors, source, canonical=canonical_star_name)


def adapter_entries(depth: int, flax_prefix: str = "pixel_adapter/", ref_prefix: str = "pixel_adapter.") -> list[Entry]:
    """`PixelAdapter` Linear j <-> `layers.{2j}` of the reference Sequential (GELUs sit between)."""
    entries = []
    for j in range(depth):
        f, r = f"{flax_prefix}linears/{j}/", f"{ref_prefix}layers.{2 * j}."
        entries += [Entry(f + "kernel", r + "weight", Linear()), Entry(f + "bias", r + "bias", Identity())]
    return entries


def head_entries(flax_prefix: str = "image_head/", ref_prefix: str = "pixel_output_head.") -> list[Entry]:
    """The image head Linear(D -> K) <-> `pixel_output_head.{weight,bias}`."""
    return [
        Entry(flax_prefix + "kernel", ref_prefix + "weight", Linear()),
        Entry(flax_prefix + "bias", ref_prefix + "bias", Identity()),
    ]


def stack_entries() -> list[Entry]:
    """The stacked AR <-> `stacked_ar.model.layers.{i}.*` and `stacked_ar.model.norm.weight`."""
    return decoder_table.layer_stack_entries("stacked_ar/", STAR_PREFIXES["stacked_ar"] + "model.")


def star_entries(model) -> list[Entry]:
    """Every tensor of a `star.Star` (concrete or abstract; params and the VQ usage buffer) <-> the
    reference STAR state dict names, for the components the model has."""
    comps = model.components
    entries: list[Entry] = []
    if "base" in comps:
        entries += decoder_table.decoder_entries(model.decoder_cfg.tie_embeddings, "base/", STAR_PREFIXES["base"])
    if "vision" in comps:
        entries += vision_table.vision_entries(model.vision_cfg, "vision/", STAR_PREFIXES["vision"])
    if "stacked_ar" in comps:
        entries += stack_entries()
    if "pixel_adapter" in comps:
        entries += adapter_entries(model.star_cfg.adapter_depth)
    if "image_head" in comps:
        entries += head_entries()
    if "vq" in comps:
        paths = vq_table.state_paths(nnx.state(model.vq))
        entries += vq_table.entries(paths, STAR_PREFIXES["vq"], flax_prefix="vq/")
    return entries


def unused_prefixes(components) -> tuple[str, ...]:
    """Reference prefixes a model with `components` does not read: the ignored modules, and the STAR
    components it lacks (e.g. `llm.` for a VQ-only model, `llm.visual.` for a text-only base)."""
    return IGNORED_PREFIXES + tuple(p for c, p in STAR_PREFIXES.items() if c not in components)
