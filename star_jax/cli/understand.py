"""`star-jax understand --workdir W --image I --question "..." [--max_new_tokens 32]`: the base answers."""

from __future__ import annotations

import numpy as np
from absl import flags

from star_jax import init_sources
from star_jax.cli import common
from star_jax.cli.edit import read_image
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
    flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "question"], flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    try:
        images = None if fv.image is None else np.stack([read_image(fv.image)])
        star = runner.StarRunner(*init_sources.load_workdir(fv.workdir, ANSWERING_STAGES)[:2])
        answer = star.understand(images, [fv.question], max_new_tokens=fv.max_new_tokens, temperature=fv.temperature)
    except (ValueError, init_sources.WorkdirError) as e:  # an unreadable image, no checkpoint
        return common.error(argv[0], e)
    print(answer[0])
    return 0
