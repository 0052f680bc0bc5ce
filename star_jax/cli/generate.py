"""`star-jax generate --workdir W --prompt "..." | --prompts FILE [--num 4 --cfg 3 --top_k 100
--top_p 0.9 --temperature 1 --seed 0 --reasoning] --out DIR`: PNGs, a grid and a JSONL of prompts
and seeds. Deterministic for a seed; a prompt that fails is reported and the others still render."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image


def sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="training workdir (newest editing / generation stage)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance weight")
    p.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--reasoning", action="store_true", help="implicit reasoning: the base rewrites the prompt first")
    sampling_flags(p)
    args = p.parse_args(argv[1:])
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not os.path.exists(args.prompts):
            print(f"star-jax generate: --prompts file {args.prompts!r} does not exist", file=sys.stderr)
            return 2
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    from star_jax.decode import runner
    from star_jax.metrics import image_grid

    try:
        star = runner.StarRunner.from_workdir(args.workdir)
    except runner.WorkdirError as e:
        print(f"star-jax generate: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    kw = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    all_images, failed = [], 0
    with open(os.path.join(args.out, "samples.jsonl"), "w") as log:
        for i, prompt in enumerate(prompts):
            seed = args.seed + i * args.num
            print(f"\r[{i + 1}/{len(prompts)}] {prompt[:60]}", end="", file=sys.stderr, flush=True)
            try:
                if args.reasoning:
                    drawn, images, _ = star.reason_then_draw(prompt, num=args.num, seed=seed, **kw)
                else:
                    drawn = prompt
                    images, _ = star.text_to_image([prompt], num=args.num, seed=seed, **kw)
            except ValueError as e:  # empty / too long prompts, unknown words
                failed += 1
                print(f"\nprompt {i} failed: {e}", file=sys.stderr)
                log.write(json.dumps({"index": i, "prompt": prompt, "error": str(e)}) + "\n")
                continue
            for k, img in enumerate(images):
                name = f"{i:05d}_{k}.png"
                Image.fromarray(img).save(os.path.join(args.out, name))
                row = {"index": i, "prompt": prompt, "seed": seed + k, "file": name, **kw}
                if args.reasoning:
                    row["rewritten_prompt"] = drawn
                log.write(json.dumps(row) + "\n")
            all_images.extend(images)
    print(file=sys.stderr)
    if all_images:
        Image.fromarray(image_grid(np.stack(all_images), cols=args.num if args.num > 1 else None)).save(
            os.path.join(args.out, "grid.png")
        )
    print(f"wrote {len(all_images)} images to {args.out} ({failed} prompts failed)")
    return 1 if failed and not all_images else 0
