"""`star-jax edit --workdir W --image I [--image I2 ...] --instruction "..." [...] --out DIR`:
edits a batch of images (one instruction per image, or one for all)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

from star_jax.cli.generate import sampling_flags


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file; raises ValueError naming the file when unreadable."""
    if not os.path.exists(path):
        raise ValueError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path!r} cannot be read: {e}") from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--instruction", action="append", required=True)
    sampling_flags(p)
    args = p.parse_args(argv[1:])
    instructions = args.instruction * len(args.image) if len(args.instruction) == 1 else args.instruction
    try:
        images = [read_image(path) for path in args.image]
    except ValueError as e:
        print(f"star-jax edit: {e}", file=sys.stderr)
        return 2
    from star_jax.decode import runner

    try:
        star = runner.StarRunner.from_workdir(args.workdir)
        out = star.edit(
            images,
            instructions,
            cfg=args.cfg,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"star-jax edit: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for i, img in enumerate(out):
        Image.fromarray(img).save(os.path.join(args.out, f"edit_{i:03d}.png"))
    print(f"wrote {len(out)} edited images to {args.out}")
    return 0
