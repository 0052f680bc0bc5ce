"""The abstract batch of a stage: the keys, shapes and dtypes the trainer's jitted step receives,
from the config alone (no tokenizer file, no records, nothing allocated).

`batch_signature(config)` mirrors the builders of `input.examples` (module docstring there) batched
to the global `config.train.batch_size`; tests/test_aot.py checks it against a real batch of
`input.pipeline.make_iterator` for every STAR stage, so the two cannot drift apart.
"""

from __future__ import annotations

import jax
import numpy as np

from star_jax import stages
from star_jax.input import examples


def _prompt(spec: examples.ExampleSpec, *, uncond: bool, bool_keys: tuple[str, ...]) -> dict:
    """[Tp] prompt arrays: ids (and unconditional ids) int32, masks bool."""
    tp = spec.max_prompt_len
    out = {"prompt_ids": ((tp,), np.int32), "prompt_mask": ((tp,), np.bool_)}
    if uncond:
        out["uncond_ids"] = ((tp,), np.int32)
    out.update({key: ((tp,), np.bool_) for key in bool_keys})
    return out


def _vit_pixels(spec: examples.ExampleSpec) -> tuple:
    """[P, 3 * temporal * patch**2] float32: the ViT patches of one image at the fixed square size."""
    t, h, w = spec.vit_grid
    return ((t * h * w, 3 * spec.temporal_patch_size * spec.patch_size**2), np.float32)


def _image_target(spec: examples.ExampleSpec, prefix: str = "") -> dict:
    """`<prefix>codes` [N] int32 when pretokenized, else `<prefix>images` [S, S, 3] float32."""
    if spec.pretokenized:
        return {f"{prefix}codes": ((spec.num_codes,), np.int32)}
    s = spec.vq_image_size
    return {f"{prefix}images": ((s, s, 3), np.float32)}


def _vq_images(spec):
    s = spec.vq_image_size
    return {"images": ((s, s, 3), np.float32)}


def _understanding(spec):
    out = _prompt(spec, uncond=False, bool_keys=("vit_mask",))
    out["text_targets"] = ((spec.max_prompt_len,), np.int32)
    out["positions"] = ((3, spec.max_prompt_len), np.int32)
    out["pixels"] = _vit_pixels(spec)
    return out


def _generation(spec):
    out = _prompt(spec, uncond=True, bool_keys=())
    out["positions"] = ((3, spec.max_prompt_len + spec.num_codes), np.int32)
    out.update(_image_target(spec))
    return out


def _editing(spec):
    out = _prompt(spec, uncond=True, bool_keys=("src_mask", "vit_mask"))
    out["positions"] = ((3, spec.max_prompt_len + spec.num_codes), np.int32)
    out["pixels"] = _vit_pixels(spec)
    out.update(_image_target(spec, "src_"))
    out.update(_image_target(spec))
    return out


# example builder -> (ExampleSpec -> {key: (per-example shape, numpy dtype)})
_PER_EXAMPLE = {
    examples.vq_images: _vq_images,
    examples.understanding: _understanding,
    examples.generation: _generation,
    examples.editing: _editing,
}


def example_signature(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of one example of `config.stage` (no batch dimension).

    A ValueError naming config.stage when its example builder is not one of `input.examples`'s
    (a project's stage: its batch cannot be derived without running its builder).
    """
    stage = stages.for_config(config)
    per_example = _PER_EXAMPLE.get(stage.example)
    if per_example is None:
        name = getattr(stage.example, "__qualname__", repr(stage.example))
        raise ValueError(
            f"config.stage={config.stage!r}: no abstract batch for its example builder {name} "
            f"(known: {', '.join(f.__name__ for f in _PER_EXAMPLE)})"
        )
    spec = examples.ExampleSpec.from_config(config, stage)
    return {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in per_example(spec).items()}


def batch_signature(config, batch_size: int | None = None, shardings: dict | None = None) -> dict:
    """{key: jax.ShapeDtypeStruct [B, ...]} of the global batch the train step receives.

    B = `batch_size` (default `config.train.batch_size`); `shardings` maps a key to the
    jax.sharding.Sharding its array carries (keys left out carry none).
    """
    b = config.train.batch_size if batch_size is None else batch_size
    shardings = shardings or {}
    return {
        key: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=shardings.get(key))
        for key, (shape, dtype) in sorted(example_signature(config).items())
    }
