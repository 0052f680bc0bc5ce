"""`star-jax generate --workdir W --prompt "..." | --prompts FILE [--num 4 --cfg 3 --top_k 100
--top_p 0.9 --temperature 1 --seed 0 --reasoning] --out DIR`: PNGs, a grid and a JSONL of prompts
and seeds. Deterministic for a seed; a prompt that fails is reported and the others still render."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags
from PIL import Image

from star_jax import init_sources, metrics
from star_jax.cli import common
from star_jax.decode import runner

# Stages whose checkpoints can draw, newest first.
DRAWING_STAGES = ("editing", "generation")


def sampling_flags(fv: flags.FlagValues) -> None:
    """--workdir, --out (both required) and the sampling flags shared by `generate` and `edit`."""
    flags.DEFINE_string("workdir", None, "training workdir (newest editing / generation stage)", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_float("cfg", 3.0, "classifier-free guidance weight", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "0 = no top-k filter", lower_bound=0, flag_values=fv)
    flags.DEFINE_float(
        "top_p", 1.0, "nucleus sampling mass; 1 = no filter", lower_bound=0.0, upper_bound=1.0, flag_values=fv
    )
    flags.DEFINE_float("temperature", 1.0, "0 = greedy", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


class InputError(ValueError):
    """A bad command-line input, found before any model loads (the command returns 2 naming it)."""


def check_paths(workdir: str, out: str | None = None) -> None:
    """Raises InputError unless `workdir` is a directory and `out` (if given) is not a file."""
    if not os.path.isdir(workdir):
        raise InputError(f"--workdir {workdir!r} does not exist (a training workdir with a trained stage)")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory")


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """The prompts of --prompt or --prompts FILE (one per non-blank line); InputError for an empty
    prompt or a missing or empty file."""
    if prompt is not None:
        if not prompt.strip():
            raise InputError("--prompt is empty")
        return [prompt]
    if not os.path.isfile(prompts_file):
        raise InputError(f"--prompts file {prompts_file!r} does not exist")
    with open(prompts_file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise InputError(f"--prompts file {prompts_file!r} holds no prompt (one per line)")
    return prompts


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("prompt", None, "one prompt", flag_values=fv)
    flags.DEFINE_string("prompts", None, "a text file with one prompt per line", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["prompt", "prompts"], required=True, flag_values=fv)
    flags.DEFINE_integer("num", 1, "images per prompt", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("reasoning", False, "implicit reasoning: the base rewrites the prompt first", flag_values=fv)
    sampling_flags(fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    try:
        prompts = read_prompts(fv.prompt, fv.prompts)
        check_paths(fv.workdir, fv.out)
    except InputError as e:
        return common.error(prog, e)
    try:
        star = runner.StarRunner(*init_sources.load_workdir(fv.workdir, DRAWING_STAGES)[:2])
    except init_sources.WorkdirError as e:
        return common.error(prog, e)
    common.log_to(os.path.join(fv.workdir, "star_jax.log"))
    os.makedirs(fv.out, exist_ok=True)
    kw = dict(cfg=fv.cfg, top_k=fv.top_k, top_p=fv.top_p, temperature=fv.temperature)
    all_images, failed = [], 0
    with open(os.path.join(fv.out, "samples.jsonl"), "w") as log:
        for i, prompt in enumerate(prompts):
            seed = fv.seed + i * fv.num
            print(f"\r[{i + 1}/{len(prompts)}] {prompt[:60]}", end="", file=sys.stderr, flush=True)
            try:
                if fv.reasoning:
                    drawn, images, _ = star.reason_then_draw(prompt, num=fv.num, seed=seed, **kw)
                else:
                    drawn = prompt
                    images, _ = star.text_to_image([prompt], num=fv.num, seed=seed, **kw)
            except ValueError as e:  # empty / too long prompts, unknown words
                failed += 1
                print(f"\nprompt {i} failed: {e}", file=sys.stderr)
                log.write(json.dumps({"index": i, "prompt": prompt, "error": str(e)}) + "\n")
                continue
            for k, img in enumerate(images):
                name = f"{i:05d}_{k}.png"
                Image.fromarray(img).save(os.path.join(fv.out, name))
                row = {"index": i, "prompt": prompt, "seed": seed + k, "file": name, **kw}
                if fv.reasoning:
                    row["rewritten_prompt"] = drawn
                log.write(json.dumps(row) + "\n")
            all_images.extend(images)
    print(file=sys.stderr)
    if all_images:
        grid = metrics.image_grid(np.stack(all_images), cols=fv.num if fv.num > 1 else None)
        Image.fromarray(grid).save(os.path.join(fv.out, "grid.png"))
    print(f"wrote {len(all_images)} images to {fv.out} ({failed} prompts failed)")
    return 1 if failed and not all_images else 0
