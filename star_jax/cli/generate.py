"""`star-jax generate --workdir W --prompt "..." | --prompts FILE [--num 4 --cfg 5 --top_k 1000
--top_p 0.9 --temperature 1 --seed 0 --reasoning --image_size 384 --reference_numerics] --out DIR`:
PNGs, a grid and a JSONL of prompts and seeds. Deterministic for a seed. Every prompt is checked
against the stage's prompt length before anything is written.

Sampling defaults (`--cfg`, `--top_k`, `--top_p` left unset): on STAR weights imported with
`star-jax import --star` and not trained further, the reference's Python API (cfg 5, top-k 1000,
top-p 1); on a run trained here, its config's (`train.sample_cfg`, no top-k, no top-p)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags
from PIL import Image

from star_jax import checkpointing, init_sources, metrics, sequences
from star_jax.cli import common
from star_jax.decode import runner

# Stages whose checkpoints can draw, newest first.
DRAWING_STAGES = ("editing", "generation")


# The reference's Python API defaults (STAR_SPEC section 3), used on imported reference weights.
REFERENCE_SAMPLING = dict(cfg=5.0, top_k=1000, top_p=1.0)


def sampling_flags(fv: flags.FlagValues) -> None:
    """--workdir, --out (both required) and the sampling / resolution flags shared by `generate` and `edit`."""
    flags.DEFINE_string("workdir", None, "training workdir (newest editing / generation stage)", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_float(
        "cfg",
        None,
        "classifier-free guidance weight (default: 5 on imported STAR weights, else train.sample_cfg)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "top_k",
        None,
        "0 = no top-k filter (default: 1000 on imported STAR weights, else 0)",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "top_p",
        None,
        "nucleus sampling mass; 1 = no filter (default 1)",
        lower_bound=0.0,
        upper_bound=1.0,
        flag_values=fv,
    )
    flags.DEFINE_float("temperature", 1.0, "0 = greedy", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.DEFINE_integer(
        "image_size",
        0,
        "pixels of the drawn image; VQ tokens = (size / 16)^2 at 3b / 7b (0 = config.model.vq.image_size)",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "reference_numerics",
        False,
        "head logits, CFG and top-k / top-p in bfloat16 with the reference's tie rules",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def is_reference_import(workdir: str, stage: str, config) -> bool:
    """Whether `workdir/<stage>` holds STAR weights imported from a released file (`star-jax import
    --star`: its saved `train.init_from` names a `star:` source) that no training has moved past
    the import's step 0."""
    if not any(str(s).startswith("star:") for s in config.train.get("init_from", ())):
        return False
    steps = checkpointing.complete_steps(os.path.join(workdir, stage))
    return bool(steps) and max(steps) == 0


def sampling_settings(fv: flags.FlagValues, workdir: str, stage: str, config) -> dict:
    """cfg / top_k / top_p / temperature / reference_numerics of the command: the flags given, the
    rest from `REFERENCE_SAMPLING` (imported reference weights) or the run's config."""
    defaults = (
        REFERENCE_SAMPLING
        if is_reference_import(workdir, stage, config)
        else dict(cfg=float(config.train.get("sample_cfg", 3.0)), top_k=0, top_p=1.0)
    )
    out = {k: (defaults[k] if fv[k].value is None else fv[k].value) for k in ("cfg", "top_k", "top_p")}
    return out | dict(temperature=fv.temperature, reference_numerics=fv.reference_numerics)


def open_workdir(workdir: str, stages, image_size: int = 0, **vit) -> tuple[runner.RunnerInputs, str]:
    """The newest of `stages` under `workdir`, read without its weights: (`RunnerInputs` at
    `image_size` and the ViT bounds `vit`, the stage name), to check every input before anything
    loads. Raises WorkdirError (no such stage) or InputError (a bad --image_size)."""
    found = init_sources.first_trained_stage(workdir, stages)
    if found is None:
        raise init_sources.WorkdirError(f"--workdir {workdir!r} has no trained {' or '.join(stages)} checkpoint")
    stage, config = found
    if config.data.tokenizer not in init_sources.BUILTIN_TOKENIZERS and not os.path.exists(config.data.tokenizer):
        config.data.tokenizer = init_sources.weights_tokenizer(config, workdir, resuming=True) or config.data.tokenizer
    try:
        return runner.RunnerInputs(config, image_size=image_size, **vit), stage
    except ValueError as e:
        raise InputError(f"--image_size={image_size}: {e}") from None


def load_runner(fv: flags.FlagValues, inputs: runner.RunnerInputs, stages, **vit) -> tuple[runner.StarRunner, dict]:
    """The checked stage's weights as a `StarRunner` (the same resolution as `inputs`) and the
    command's sampling settings."""
    model, config, stage = init_sources.load_workdir(fv.workdir, stages)
    star = runner.StarRunner(model, config, inputs.tok, image_size=fv.image_size, **vit)
    return star, sampling_settings(fv, fv.workdir, stage, config)


def too_long(flag: str, e: sequences.SequenceTooLong) -> InputError:
    """The one line for an input whose prompt does not fit the stage's prompt length."""
    return InputError(
        f"{flag}: its prompt needs {e.needed} tokens, above the stage's config.data.max_prompt_len={e.limit} "
        f"(shorten it, or retrain / re-import with --config.data.max_prompt_len={e.needed})"
    )


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
    flags.DEFINE_string(
        "reasoning_suffix",
        runner.REASONING_SUFFIX,
        "appended to the base's rewrite (the reference's default)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_reasoning_tokens", 256, "longest rewrite (the reference: 256)", lower_bound=1, flag_values=fv
    )
    sampling_flags(fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    try:
        prompts = read_prompts(fv.prompt, fv.prompts)
        check_paths(fv.workdir, fv.out)
    except InputError as e:
        return common.error(prog, e)
    try:
        inputs, _ = open_workdir(fv.workdir, DRAWING_STAGES, fv.image_size)
        for i, prompt in enumerate(prompts):
            flag = "--prompt" if fv.prompt is not None else f"--prompts line {i + 1}"
            try:
                inputs.check_prompt(prompt, reasoning=fv.reasoning, suffix=fv.reasoning_suffix)
            except sequences.SequenceTooLong as e:
                raise too_long(flag, e) from None
        star, kw = load_runner(fv, inputs, DRAWING_STAGES)
    except (InputError, init_sources.WorkdirError) as e:
        return common.error(prog, e)
    common.log_to(os.path.join(fv.workdir, "star_jax.log"))
    os.makedirs(fv.out, exist_ok=True)
    all_images, failed = [], 0
    with open(os.path.join(fv.out, "samples.jsonl"), "w") as log:
        for i, prompt in enumerate(prompts):
            seed = fv.seed + i * fv.num
            print(f"\r[{i + 1}/{len(prompts)}] {prompt[:60]}", end="", file=sys.stderr, flush=True)
            try:
                if fv.reasoning:
                    drawn, images, _ = star.reason_then_draw(
                        prompt,
                        suffix=fv.reasoning_suffix,
                        max_reasoning_tokens=fv.max_reasoning_tokens,
                        num=fv.num,
                        seed=seed,
                        **kw,
                    )
                else:
                    drawn = prompt
                    images, _ = star.text_to_image([prompt], num=fv.num, seed=seed, **kw)
            except ValueError as e:  # unknown words of a tokenizer
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
