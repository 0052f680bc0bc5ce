"""`star-jax edit --workdir W --image I [--image I2 ...] --instruction "..." [...] --out DIR`:
edits a batch of images (one instruction per image, or one for all)."""

from __future__ import annotations

import os

import numpy as np
from absl import flags
from PIL import Image

from star_jax import images as image_lib
from star_jax import init_sources
from star_jax.cli import common
from star_jax.cli.generate import DRAWING_STAGES, InputError, check_paths, sampling_flags
from star_jax.decode import runner


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file through the one loader (`images.load_image`: EXIF
    orientation, 16-bit scaled, transparency over white); raises ValueError (images.ImageError)
    naming the file when it is missing, unreadable or not an image."""
    return image_lib.load_image(path, name=path)


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("image", None, "image file to edit (repeat for a batch)", flag_values=fv)
    flags.DEFINE_multi_string(
        "instruction", None, "edit instruction: one for all images, or one per --image", flag_values=fv
    )
    flags.mark_flags_as_required(["image", "instruction"], flag_values=fv)
    sampling_flags(fv)
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
    try:
        star = runner.StarRunner(*init_sources.load_workdir(fv.workdir, DRAWING_STAGES)[:2])
        common.log_to(os.path.join(fv.workdir, "star_jax.log"))
        out = star.edit(
            images,
            instructions,
            cfg=fv.cfg,
            top_k=fv.top_k,
            top_p=fv.top_p,
            temperature=fv.temperature,
            seed=fv.seed,
        )
    except (ValueError, init_sources.WorkdirError) as e:  # no checkpoint, an instruction that does not fit
        return common.error(prog, e)
    os.makedirs(fv.out, exist_ok=True)
    for i, img in enumerate(out):
        Image.fromarray(img).save(os.path.join(fv.out, f"edit_{i:03d}.png"))
    print(f"wrote {len(out)} edited images to {fv.out}")
    return 0
