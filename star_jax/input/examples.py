"""Record -> the per-example arrays of a stage: what one example needs (`ExampleSpec`), the helpers
that read and validate a record (`Prepare`), and the builders STAR's stages name (`stages.Stage.example`).

A builder is `(prepare, record) -> dict of numpy arrays`; it raises `records.BadRecord` or
`sequences.SequenceTooLong` for a record it cannot use (`Prepare` turns those into counted skips).
STAR's builders (B = batch rows once batched; Tp = data.max_prompt_len, N = VQ codes per image,
P = ViT patches per image):

  vq_images      images [H, W, 3] float32 in [-1, 1] (the VQ's input size)
  understanding  prompt_ids, prompt_mask, text_targets [Tp] (-1 = no loss), vit_mask [Tp] bool,
                 positions [3, Tp] int32, pixels [P, patch_dim] float32
  generation     prompt_ids, uncond_ids [Tp] int32, prompt_mask [Tp] bool, positions [3, Tp + N] int32,
                 and codes [N] int32 (pretokenized) or images [H, W, 3] float32
  editing        the generation keys + src_mask, vit_mask [Tp] bool, pixels [P, patch_dim] float32,
                 src_codes [N] int32 / src_images [H, W, 3] float32
Prompts are left-padded to Tp (no packing: the loss masks are `prompt_mask` / `text_targets`).
`random_flip` is the VQ stage's seeded random op (`stages.Stage.augment`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from star_jax import images as image_lib
from star_jax import records, sequences
from star_jax.input.bad_records import Skipped
from star_jax.models import vision_preprocess
from star_jax.models import vq as vq_model
from star_jax.text import tokenizer as tokenizer_lib

# (Prepare, record dict) -> the example's arrays
ExampleBuilder = Callable[["Prepare", dict], dict]


# ------------------------------------------------------------------------------------------------
# What one example needs (picklable: it travels into Grain worker processes)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Sizes and validation limits of one example, from the config.

    data: `config.data` as a plain dict, for the keys a project's builder reads (its own knobs).
    """

    tokenizer: str
    max_prompt_len: int
    vq_image_size: int
    vq_grid: int  # codes per side; N = vq_grid ** 2
    codebook_size: int
    vit_image_size: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    pretokenized: bool
    vocab_size: int
    min_image_size: int
    max_aspect_ratio: float
    data: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config, stage) -> ExampleSpec:
        """The spec of `config` for `stage` (a `stages.Stage`; its ViT input size is validated when
        `stage.uses_vit`)."""
        vq, vision, data = config.model.vq, config.model.vision, config.data
        if stage.uses_vit:
            vit_grid(config)  # validates vit_image_size against the patch grid
        return cls(
            tokenizer=data.tokenizer,
            max_prompt_len=data.max_prompt_len,
            vq_image_size=vq.image_size,
            vq_grid=vq_model.grid_size(vq),
            codebook_size=vq.codebook_size,
            vit_image_size=data.vit_image_size,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            pretokenized=bool(data.pretokenized),
            vocab_size=config.model.decoder.vocab_size,
            min_image_size=data.min_image_size,
            max_aspect_ratio=data.max_aspect_ratio,
            data=data.to_dict(),
        )

    @property
    def num_codes(self) -> int:
        """N: VQ codes per image."""
        return self.vq_grid**2

    @property
    def vit_grid(self) -> tuple[int, int, int]:
        """(t, h, w) patch grid of the ViT input (every image is resized to the fixed square size)."""
        return (1, self.vit_image_size // self.patch_size, self.vit_image_size // self.patch_size)

    @property
    def merged_grid(self) -> int:
        """G: merged ViT tokens per image side (G * G tokens per image)."""
        return self.vit_image_size // (self.patch_size * self.merge_size)


def vit_grid(config) -> tuple[int, int, int]:
    """(t, h, w) patch grid of the ViT input of `config` (fixed: every image is resized to a square);
    a ValueError naming config.data.vit_image_size when it is not a multiple of patch * merge."""
    s, p = config.data.vit_image_size, config.model.vision.patch_size
    factor = p * config.model.vision.spatial_merge_size
    if s % factor:
        raise ValueError(f"config.data.vit_image_size={s} must be a multiple of patch * merge = {factor}")
    return (1, s // p, s // p)


# ------------------------------------------------------------------------------------------------
# Per example


class Prepare:
    """index -> `example(self, record)` for the record at `index`, or a `Skipped` naming why not.

    source: random access to records (or their bytes); parser: bytes -> record dict, or None;
    example: the stage's builder (`stages.Stage.example`); None when only `read` / `image` are used.
    """

    def __init__(self, source, parser, spec: ExampleSpec, example: ExampleBuilder | None = None):
        self.source, self.parser, self.spec, self.example = source, parser, spec, example
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        """The tokenizer of `spec.tokenizer` (loaded on first use, in each worker process)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_lib.load_tokenizer(self.spec.tokenizer)
        return self._tokenizer

    def read(self, index: int) -> dict:
        """The record at `index`, parsed (bytes -> dict) when the source is serialised."""
        raw = self.source[int(index)]
        return self.parser(raw) if self.parser is not None else raw

    def __call__(self, index: int):
        try:
            return self.example(self, self.read(index))
        except records.BadRecord as e:
            return Skipped(int(index), e.reason, e.detail)
        except sequences.SequenceTooLong as e:
            return Skipped(int(index), "too_long", str(e), needed=e.needed, limit=e.limit)
        except Exception as e:  # anything else a record can trigger is counted, not fatal
            return Skipped(int(index), "other", f"{type(e).__name__}: {e}")

    def text(self, record: dict, name: str) -> str:
        """record[name] as stripped non-empty str (or BadRecord)."""
        return records.decode_text(records.field(record, name), name)

    def image(self, record: dict, name: str) -> np.ndarray:
        """record[name] as uint8 [H, W, 3], within the spec's size and aspect limits (or BadRecord)."""
        s = self.spec
        return records.decode_image(
            records.field(record, name), name, min_size=s.min_image_size, max_aspect=s.max_aspect_ratio
        )

    def vq_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> the VQ's input: float32 [S, S, 3] in [-1, 1] (S = vq_image_size), the
        centre square resized bilinearly (the reference's VQ input filter; training crops where the
        reference's inference stretches an edit's source, so that a batch never holds distorted
        targets)."""
        square = image_lib.resize_square(image, self.spec.vq_image_size, crop=True, resample="bilinear")
        return image_lib.to_unit_range(square)

    def target(self, out: dict, record: dict, image_field: str, codes_field: str, key: str = "") -> None:
        """Adds `<key>codes` [N] int32 (pretokenized) or `<key>images` [S, S, 3] float32 to `out`."""
        s = self.spec
        if s.pretokenized:
            out[f"{key}codes"] = records.check_codes(
                records.field(record, codes_field), codes_field, num_codes=s.num_codes, codebook_size=s.codebook_size
            )
        else:
            out[f"{key}images"] = self.vq_image(self.image(record, image_field))

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """uint8 image -> ViT patches [P, 3 * temporal * patch**2] float32 at the fixed square size
        `vit_image_size` (centre square): training batches need one static ViT grid, so training does
        not use the aspect-keeping `smart_resize` that inference (`decode.runner.vit_inputs`) uses."""
        s = self.spec
        size = s.vit_image_size
        pixels, _ = vision_preprocess.preprocess(
            [image_lib.resize_square(image, size, crop=True)],
            min_pixels=size * size,
            max_pixels=size * size,
            patch_size=s.patch_size,
            merge_size=s.merge_size,
            temporal_patch_size=s.temporal_patch_size,
        )
        return pixels


# ------------------------------------------------------------------------------------------------
# STAR's builders


def vq_images(prepare: Prepare, record: dict) -> dict:
    """A pairs record -> {"images": [S, S, 3] float32 in [-1, 1]} (the VQ autoencoder's input)."""
    return {"images": prepare.vq_image(prepare.image(record, "image"))}


def understanding(prepare: Prepare, record: dict) -> dict:
    """A qa record (question, answer, optional follow_ups) -> the chat's arrays (module docstring)."""
    s = prepare.spec
    follow_ups = record.get("follow_ups")
    out = sequences.understanding_example(
        prepare.tokenizer,
        prepare.text(record, "question"),
        prepare.text(record, "answer"),
        max_prompt_len=s.max_prompt_len,
        vit_grid_thw=s.vit_grid,
        spatial_merge_size=s.merge_size,
        follow_ups=records.decode_turns(follow_ups) if follow_ups is not None else (),
    )
    out["pixels"] = prepare.pixels(prepare.image(record, "image"))
    return out


def generation(prepare: Prepare, record: dict) -> dict:
    """A pairs record -> caption prompt arrays + the image's codes [N] int32 or images [S, S, 3] float32."""
    s = prepare.spec
    out = sequences.generation_example(
        prepare.tokenizer,
        prepare.text(record, "caption"),
        max_prompt_len=s.max_prompt_len,
        num_image_tokens=s.num_codes,
    )
    prepare.target(out, record, "image", "codes")
    return out


def editing(prepare: Prepare, record: dict) -> dict:
    """An edits record -> instruction prompt arrays with the source's VQ and ViT slots, the source's
    pixels and codes / images (src_), and the target's codes / images."""
    s = prepare.spec
    out = sequences.editing_example(
        prepare.tokenizer,
        prepare.text(record, "instruction"),
        max_prompt_len=s.max_prompt_len,
        num_vq_tokens=s.num_codes,
        vit_grid_thw=s.vit_grid,
        spatial_merge_size=s.merge_size,
    )
    source = prepare.image(record, "source_image")
    out["pixels"] = prepare.pixels(source)
    if s.pretokenized:
        prepare.target(out, record, "source_image", "source_codes", "src_")
    else:
        out["src_images"] = prepare.vq_image(source)
    prepare.target(out, record, "target_image", "target_codes")
    return out


def random_flip(example, rng: np.random.Generator):
    """Seeded random op: horizontal flip of `images` [H, W, 3] with probability 1/2 (Skipped passes)."""
    if isinstance(example, Skipped) or rng.random() >= 0.5:
        return example
    return {**example, "images": np.ascontiguousarray(example["images"][:, ::-1])}
