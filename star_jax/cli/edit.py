"""`star-jax edit --workdir W --image I [--image I2 ...] --instruction "..." [...] --out DIR`:
edits a batch of images (one instruction per image, or one for all), as the reference does
(STAR_SPEC section 4): the source goes bilinearly to the VQ's square and, aspect ratio kept, through
the Qwen2.5-VL processor's smart_resize to the ViT within --vit_min_pixels / --vit_max_pixels
(default config.data.vit_min_pixels / vit_edit_max_pixels: 28 * 28 * 576 at 3b / 7b). Sampling
defaults as `star-jax generate`. Every image and instruction is checked before anything is written."""

from __future__ import annotations

import os

import numpy as np
from absl import flags
from PIL import Image

from star_jax import images as image_lib
from star_jax import init_sources, sequences
from star_jax.cli import common
from star_jax.cli.generate import (
    DRAWING_STAGES,
    InputError,
    check_paths,
    load_runner,
    open_workdir,
    sampling_flags,
    too_long,
)


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file through the one loader (`images.load_image`: EXIF
    orientation, 16-bit scaled, transparency over white); raises ValueError (images.ImageError)
    naming the file when it is missing, unreadable or not an image."""
    return image_lib.load_image(path, name=path)


def vit_flags(fv: flags.FlagValues, what: str) -> None:
    """--vit_min_pixels / --vit_max_pixels: the smart_resize bounds of the ViT input (0 = the config's)."""
    flags.DEFINE_integer(
        "vit_min_pixels", 0, "fewest ViT input pixels (0 = config.data.vit_min_pixels)", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer(
        "vit_max_pixels", 0, f"most ViT input pixels (0 = config.data.{what})", lower_bound=0, flag_values=fv
    )


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("image", None, "image file to edit (repeat for a batch)", flag_values=fv)
    flags.DEFINE_multi_string(
        "instruction", None, "edit instruction: one for all images, or one per --image", flag_values=fv
    )
    flags.mark_flags_as_required(["image", "instruction"], flag_values=fv)
    sampling_flags(fv)
    vit_flags(fv, "vit_edit_max_pixels")
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    if len(fv.instruction) not in (1, len(fv.image)):
        common.usage_error(prog, f"{len(fv.instruction)} --instruction for {len(fv.image)} --image: give 1 or one each")
    instructions = fv.instruction * len(fv.image) if len(fv.instruction) == 1 else fv.instruction
    empty = [i for i, ins in enumerate(fv.instruction) if not ins.strip()]
    try:
        if empty:
            raise InputError(f"--instruction {'' if len(fv.instruction) == 1 else f'#{empty[0] + 1} '}is empty")
        check_paths(fv.workdir, fv.out)
        images = [read_image(path) for path in fv.image]
    except ValueError as e:  # an empty instruction, no workdir, a missing or unreadable image
        return common.error(prog, e)
    vit = dict(vit_min_pixels=fv.vit_min_pixels, vit_max_pixels=fv.vit_max_pixels)
    names = [f"--image {p}" for p in fv.image]
    try:
        inputs, _ = open_workdir(fv.workdir, DRAWING_STAGES, fv.image_size, **vit)
        inputs.check_edit(images, instructions, names=names)
        star, kw = load_runner(fv, inputs, DRAWING_STAGES, **vit)
        common.log_to(os.path.join(fv.workdir, "star_jax.log"))
        out = star.edit(images, instructions, seed=fv.seed, names=names, **kw)
    except sequences.SequenceTooLong as e:
        return common.error(prog, too_long("--instruction", e))
    except (ValueError, init_sources.WorkdirError) as e:  # no checkpoint, an image below the ViT's minimum
        return common.error(prog, e)
    os.makedirs(fv.out, exist_ok=True)
    for i, img in enumerate(out):
        Image.fromarray(img).save(os.path.join(fv.out, f"edit_{i:03d}.png"))
    print(f"wrote {len(out)} edited images to {fv.out}")
    return 0
