"""Mapping table of the VQ tokenizer: a star_jax `VQModel` <-> the reference STAR-VQ / LlamaGen VQGAN names.

The star_jax module tree mirrors the reference names (`encoder.conv_blocks.{l}.res.{j}.conv1`, ...),
so the table is a few patterns over the `/`-joined nnx path: the part before the leaf maps to the
same dotted reference prefix, and the leaf picks the reference suffix and the layout transform
(torch Conv2d (out, in, kh, kw) <-> Flax (kh, kw, in, out)). `entries(paths, prefix)` expands the
table into concrete `table.Entry`s for one model, so import and export walk the same entries.
A STAR checkpoint nests the same names under `pixel_encoder.` (STAR_SPEC section 8).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from flax import nnx

from star_jax.convert.table import Conv, Entry, Identity, tensor_shape, to_ref

STAR_PREFIX = "pixel_encoder."
USAGE_NAME = "quantize.codebook_used"  # the usage buffer (not a parameter; int64 in the reference)

# (flax path regex, reference name template using the regex groups, transform); first match wins.
VQ_TABLE: tuple[tuple[str, str, object], ...] = (
    (r"^quantize/embedding$", "quantize.embedding.weight", Identity()),
    (r"^quantize/codebook_used$", USAGE_NAME, Identity()),  # rolling usage window, float32
    (r"^(.+)/kernel$", r"\1.weight", Conv()),  # every conv, attention q/k/v/proj_out included (1x1)
    (r"^(.+)/scale$", r"\1.weight", Identity()),  # GroupNorm weight
    (r"^(.+)/bias$", r"\1.bias", Identity()),  # conv and GroupNorm bias
)

# Tensors a standalone checkpoint may lack; import keeps the model's initial value for them.
OPTIONAL = (USAGE_NAME,)


def ref_name(path: str, prefix: str = "") -> tuple[str, object]:
    """(reference name, transform) of one star_jax param path ('/'-joined); raises if no pattern matches."""
    for pattern, template, transform in VQ_TABLE:
        m = re.match(pattern, path)
        if m:
            return prefix + m.expand(template).replace("/", "."), transform
    raise KeyError(f"VQ param path {path!r} matches no entry of vq_table.VQ_TABLE")


def entries(paths: Iterable[str], prefix: str = "", flax_prefix: str = "") -> list[Entry]:
    """Concrete entries for the given star_jax paths (relative to the VQModel; put under
    `flax_prefix`), reference names under `prefix`."""
    out = []
    for path in paths:
        name, transform = ref_name(path, prefix)
        out.append(Entry(flax_prefix + path, name, transform))
    return out


def state_paths(state) -> list[str]:
    """'/'-joined paths of every variable (params and the usage buffer) of an nnx state."""
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]


def detect_prefix(names: Iterable[str]) -> str:
    """'pixel_encoder.' for a full STAR state dict, '' for a standalone VQ one; raises KeyError if neither."""
    names = list(names)
    if any(n.startswith(STAR_PREFIX + "encoder.") for n in names):
        return STAR_PREFIX
    if any(n.startswith("encoder.") for n in names):
        return ""
    raise KeyError(
        f"no VQ tensors found (expected names starting with 'encoder.' or '{STAR_PREFIX}encoder.'); "
        f"first names: {names[:5]}"
    )


class SubView(Mapping):
    """The tensors under `prefix`, prefix stripped, plus `defaults` for names the source lacks."""

    def __init__(self, tensors: Mapping, prefix: str = "", defaults: Mapping[str, np.ndarray] | None = None):
        self._t, self._p = tensors, prefix
        self._names = [n[len(prefix) :] for n in tensors if n.startswith(prefix)]
        self._defaults = {k: v for k, v in (defaults or {}).items() if k not in set(self._names)}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._defaults:
            return self._defaults[name]
        if not isinstance(name, str) or self._p + name not in self._t:
            raise KeyError(name)
        return self._t[self._p + name]

    def __contains__(self, name) -> bool:
        return name in self._defaults or (isinstance(name, str) and self._p + name in self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._defaults:
            return tuple(np.shape(self._defaults[name]))
        return tensor_shape(self._t, self._p + name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names + list(self._defaults))

    def __len__(self) -> int:
        return len(self._names) + len(self._defaults)


def infer_config_fields(tensors: Mapping, prefix: str = "") -> dict:
    """VQConfig sizes read off reference tensor shapes (attention heads and norm groups are not
    stored in a state dict: they keep their defaults unless the caller overrides them)."""
    view = SubView(tensors, prefix)

    def shape(name):
        if name not in view:
            raise KeyError(f"cannot infer the VQ config: tensor {prefix + name!r} is missing")
        return view.shape(name)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for n in view if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", n))})
    res = {int(m.group(1)) for n in view if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", n))}
    ch_mult = tuple(shape(f"encoder.conv_blocks.{lv}.res.0.conv1.weight")[0] // ch for lv in levels)
    k, d = shape("quantize.embedding.weight")
    fields = dict(
        in_channels=in_channels,
        ch=ch,
        ch_mult=ch_mult,
        z_channels=shape("encoder.conv_out.weight")[0],
        num_res_blocks=len(res),
        codebook_size=k,
        codebook_dim=d,
    )
    if USAGE_NAME in view and view.shape(USAGE_NAME)[0] != k + 1:
        fields["usage_window"] = view.shape(USAGE_NAME)[0]  # e.g. LlamaGen's 65,536
    return fields


def to_reference(state, prefix: str = "") -> dict[str, np.ndarray]:
    """Reference-named numpy tensors (torch layouts) of a VQModel's nnx state, in module order."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        (entry,) = entries(["/".join(map(str, path))], prefix)
        for name, value in to_ref(entry, np.asarray(var.get_value())):
            out[name] = value
    return out
