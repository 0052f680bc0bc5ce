"""`star-jax understand --workdir W --image I --question "..." [--max_new_tokens 32]`: the base answers.

The image keeps its aspect ratio through the Qwen2.5-VL processor's smart_resize within
--vit_min_pixels / --vit_max_pixels (default config.data.vit_min_pixels / vit_max_pixels: the
processor's 56 * 56 and 28 * 28 * 1280 at 3b / 7b)."""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from star_jax import init_sources
from star_jax.cli import common
from star_jax.cli.edit import read_image, vit_flags
from star_jax.cli.generate import InputError, check_paths, open_workdir
from star_jax.decode import runner

# Stages whose checkpoints hold a base that answers, newest first.
ANSWERING_STAGES = ("editing", "generation", "understanding")


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "workdir", None, "training workdir (newest editing / generation / understanding stage)", flag_values=fv
    )
    flags.DEFINE_string("image", None, "image file (omit for a text-only question)", flag_values=fv)
    flags.DEFINE_string("question", None, "the question", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 32, "answer length limit", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy", lower_bound=0.0, flag_values=fv)
    vit_flags(fv, "vit_max_pixels")
    flags.mark_flags_as_required(["workdir", "question"], flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    try:
        if not fv.question.strip():
            raise InputError("--question is empty")
        check_paths(fv.workdir)
        images = None if fv.image is None else np.stack([read_image(fv.image)])
    except ValueError as e:  # an empty question, no workdir, a missing or unreadable image
        return common.error(prog, e)
    names = None if fv.image is None else [f"--image {fv.image}"]
    try:
        vit = dict(vit_min_pixels=fv.vit_min_pixels, vit_max_pixels=fv.vit_max_pixels)
        inputs, _ = open_workdir(fv.workdir, ANSWERING_STAGES, **vit)
        if images is not None:  # the image's size, before the weights load
            inputs.vit_inputs(images, editing=False, names=names)
        model, config, _ = init_sources.load_workdir(fv.workdir, ANSWERING_STAGES)
        star = runner.StarRunner(model, config, inputs.tok, **vit)
        common.log_to(os.path.join(fv.workdir, "star_jax.log"))
        answer = star.understand(
            images,
            [fv.question],
            max_new_tokens=fv.max_new_tokens,
            temperature=fv.temperature,
            names=names,
        )
    except (ValueError, init_sources.WorkdirError) as e:  # no checkpoint, a question that does not fit
        return common.error(prog, e)
    print(answer[0])
    return 0
