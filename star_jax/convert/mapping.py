"""The one mapping table between star_jax parameter paths and reference (HF / STAR) tensor names.

An entry pairs a star_jax path (`/`-joined nnx state path) with a reference name, which contains
`{i}` when the star_jax param is stacked over layers (leading `layers` axis), and a transform
that converts one (per-layer) tensor in each direction. Import and export both walk the same
entries, so a layout bug cannot hide in one direction only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from star_jax.convert.checkpoint_files import CheckpointError


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight (out, in) <-> Flax kernel (in_dims..., out_dims...) with `n_in` leading in-dims."""

    n_in: int = 1

    def to_flax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(w.T).reshape(shape)

    def to_ref(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[: self.n_in]), -1).T)

    def ref_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))


@dataclasses.dataclass(frozen=True)
class Reshape:
    """Same elements in row-major order; the reference keeps them flat (e.g. q bias (H*hd,) <-> (H, hd))."""

    def to_flax(self, w, shape):
        return np.asarray(w).reshape(shape)

    def to_ref(self, x):
        return np.asarray(x).reshape(-1)

    def ref_shape(self, shape):
        return (math.prod(shape),)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The same tensor in both layouts."""

    def to_flax(self, w, shape):
        return np.asarray(w).reshape(shape)

    def to_ref(self, x):
        return np.asarray(x)

    def ref_shape(self, shape):
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch Conv (out, in, *kernel) <-> Flax (*kernel, in, out)."""

    def to_flax(self, w, shape):
        nd = w.ndim
        return np.ascontiguousarray(np.transpose(w, tuple(range(2, nd)) + (1, 0))).reshape(shape)

    def to_ref(self, x):
        nd = x.ndim
        return np.ascontiguousarray(np.transpose(x, (nd - 1, nd - 2) + tuple(range(nd - 2))))

    def ref_shape(self, shape):
        return (shape[-1], shape[-2], *shape[:-2])


@dataclasses.dataclass(frozen=True)
class Entry:
    flax: str  # star_jax state path, '/'-joined
    ref: str  # reference name; '{i}' marks a param stacked over layers
    transform: Linear | Reshape | Identity | Conv

    @property
    def stacked(self) -> bool:
        return "{i}" in self.ref


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
    """A `qwen2.Decoder` <-> the Hugging Face Qwen2 / Qwen2.5-VL text names (STAR_SPEC section 8)."""
    entries = [Entry(f"{flax_prefix}embedding", f"{ref_prefix}model.embed_tokens.weight", Identity())]
    entries += layer_stack_entries(f"{flax_prefix}stack/", f"{ref_prefix}model.")
    if not tie_embeddings:
        entries.append(Entry(f"{flax_prefix}lm_head", f"{ref_prefix}lm_head.weight", Linear()))
    return entries


def ref_names(entry: Entry, flax_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The reference names and shapes one entry covers (one per layer when stacked)."""
    if entry.stacked:
        per_layer = entry.transform.ref_shape(tuple(flax_shape[1:]))
        return [(entry.ref.format(i=i), per_layer) for i in range(flax_shape[0])]
    return [(entry.ref, entry.transform.ref_shape(tuple(flax_shape)))]


def to_flax(entry: Entry, read, flax_shape: tuple[int, ...]) -> np.ndarray:
    """Builds the star_jax tensor of `entry` from `read(ref_name) -> np.ndarray`."""
    if entry.stacked:
        return np.stack(
            [entry.transform.to_flax(read(entry.ref.format(i=i)), tuple(flax_shape[1:])) for i in range(flax_shape[0])]
        )
    return entry.transform.to_flax(read(entry.ref), tuple(flax_shape))


def to_ref(entry: Entry, value: np.ndarray):
    """Yields (reference name, tensor) for a star_jax tensor, unstacking layers in order."""
    if entry.stacked:
        for i in range(value.shape[0]):
            yield entry.ref.format(i=i), entry.transform.to_ref(np.asarray(value[i]))
    else:
        yield entry.ref, entry.transform.to_ref(np.asarray(value))


# -- the whole STAR model (STAR_SPEC section 8) ----------------------------------------------------

# Reference prefixes of the STAR state dict, by star_jax component.
STAR_PREFIXES = {
    "base": "llm.",
    "vision": "llm.visual.",
    "stacked_ar": "stacked_ar.",
    "pixel_adapter": "pixel_adapter.",
    "image_head": "pixel_output_head.",
    "vq": "pixel_encoder.",
}


def adapter_entries(depth: int, flax_prefix: str = "pixel_adapter/", ref_prefix: str = "pixel_adapter.") -> list[Entry]:
    """`PixelAdapter` Linear j <-> `layers.{2j}` of the reference Sequential (GELUs sit between)."""
    entries = []
    for j in range(depth):
        f, r = f"{flax_prefix}linears/{j}/", f"{ref_prefix}layers.{2 * j}."
        entries += [Entry(f + "kernel", r + "weight", Linear()), Entry(f + "bias", r + "bias", Identity())]
    return entries


def star_entries(model) -> list[Entry]:
    """Every tensor of a `star.Star` (concrete or abstract) <-> the reference STAR state dict names.

    Composes the decoder table (`base/` <-> `llm.`), the vision table (`vision/` <-> `llm.visual.`,
    from `hf_vision`), the stack (`stacked_ar/` <-> `stacked_ar.model.layers.{i}` and
    `stacked_ar.model.norm.weight`), the adapter, the head (`image_head/` <-> `pixel_output_head.`)
    and the VQ (`vq/` <-> `pixel_encoder.`, from `vq_mapping`), for the components the model has.
    """
    from flax import nnx

    from star_jax.convert import hf_vision, vq_mapping

    comps = model.components
    entries: list[Entry] = []
    if "base" in comps:
        entries += decoder_entries(model.decoder_cfg.tie_embeddings, "base/", STAR_PREFIXES["base"])
    if "vision" in comps:
        entries += hf_vision.vision_entries(model.vision_cfg, "vision/", STAR_PREFIXES["vision"])
    if "stacked_ar" in comps:
        entries += layer_stack_entries("stacked_ar/", STAR_PREFIXES["stacked_ar"] + "model.")
    if "pixel_adapter" in comps:
        entries += adapter_entries(model.star_cfg.adapter_depth)
    if "image_head" in comps:
        head = STAR_PREFIXES["image_head"]
        entries += [
            Entry("image_head/kernel", head + "weight", Linear()),
            Entry("image_head/bias", head + "bias", Identity()),
        ]
    if "vq" in comps:
        paths = vq_mapping.state_paths(nnx.state(model.vq))
        entries += [Entry("vq/" + e.flax, e.ref, e.transform) for e in vq_mapping.entries(paths, STAR_PREFIXES["vq"])]
    return entries


def check_dtypes(entries, want: dict[str, np.dtype], dtype_of, *, source: str, cast: bool = False) -> None:
    """Raises one error naming every reference tensor whose dtype differs from its star_jax param.

    Args:
      entries: the mapping entries; want: star_jax path -> the param's dtype.
      dtype_of: reference name -> np.dtype, or None when the tensor is absent (reported elsewhere).
      cast: when True, mismatches are accepted (the caller converts explicitly).
    """
    if cast:
        return
    wrong = []
    for e in entries:
        target = np.dtype(want[e.flax])
        names = [e.ref.format(i=0)] if e.stacked else [e.ref]
        if e.stacked:  # every layer of a stacked param: a single odd layer is an error too
            i = 1
            while dtype_of(e.ref.format(i=i)) is not None:
                names.append(e.ref.format(i=i))
                i += 1
        for name in names:
            got = dtype_of(name)
            if got is not None and np.dtype(got) != target:
                wrong.append(f"{name}: expected {target}, found {np.dtype(got)}")
    if wrong:
        shown = ", ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else "")
        raise CheckpointError(f"{source}: wrong dtype ({len(wrong)}): {shown}; pass cast=True (--cast) to convert")
