"""`star-jax eval shapes`: score a folder of shapes-world images with ShapeEval and print GenEval's table.

  star-jax eval shapes --images DIR [--metadata FILE] [--results FILE]
  star-jax eval shapes --write_gt N --out DIR [--resolution 64] [--split validation] [--seed 0]

Folder layouts read:
- flat: PNGs in DIR and a metadata JSONL (`--metadata`, default DIR/metadata.jsonl), one GenEval
  metadata object per line; its "filename" names the image (default: the line number, `00000.png`);
- GenEval's: DIR/<00000>/metadata.jsonl (one object) with the images in DIR/<00000>/samples/*.png.
`--write_gt` renders N ground-truth images per GenEval task in the flat layout, to demonstrate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
from PIL import Image


def _flat(images: str, metadata: str) -> list[tuple[str, dict]]:
    items = []
    with open(metadata) as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            meta = json.loads(line)
            items.append((os.path.join(images, meta.get("filename", f"{line_no:05d}.png")), meta))
    return items


def _geneval(images: str) -> list[tuple[str, dict]]:
    items = []
    for sub in sorted(os.listdir(images)):
        folder = os.path.join(images, sub)
        if not (sub.isdigit() and os.path.isdir(folder)):
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as f:
            meta = json.load(f)
        samples = os.path.join(folder, "samples")
        for name in sorted(os.listdir(samples)):
            if re.fullmatch(r"\d+\.png", name):
                items.append((os.path.join(samples, name), meta))
    return items


def list_images(images: str, metadata: str | None = None) -> list[tuple[str, dict]]:
    """(png path, metadata) pairs of a folder in the flat or the GenEval layout."""
    if metadata is None and os.path.isfile(os.path.join(images, "metadata.jsonl")):
        metadata = os.path.join(images, "metadata.jsonl")
    items = _flat(images, metadata) if metadata else _geneval(images)
    if not items:
        raise ValueError(f"--images: no images with metadata found in {images!r}")
    return items


def score_folder(images: str, metadata: str | None = None) -> list[dict]:
    """One GenEval result row {"filename", "tag", "prompt", "correct", "reason", "metadata"} per image."""
    from star_jax import shapes

    results = []
    for path, meta in list_images(images, metadata):
        meta = {k: v for k, v in meta.items() if k != "filename"}
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        correct, reason = shapes.evaluate_image(image, meta)
        results.append(
            {
                "filename": path,
                "tag": meta.get("tag", ""),
                "prompt": meta.get("prompt", ""),
                "correct": correct,
                "reason": reason,
                "metadata": json.dumps(meta, sort_keys=True),
            }
        )
    return results


def write_ground_truth(out: str, per_task: int, *, resolution: int = 64, split: str = "validation", seed: int = 0):
    """Render `per_task` ground-truth images for each GenEval tag into `out` (flat layout). Returns the count."""
    from star_jax import shapes

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for tag in shapes.GENEVAL_TAGS:
            for i in range(per_task):
                ex = shapes.make_example(split, i, "pair", seed=seed, resolution=resolution, tag=tag)
                name = f"{tag}_{i:05d}.png"
                Image.fromarray(ex["image"]).save(os.path.join(out, name))
                f.write(json.dumps({**ex["metadata"], "filename": name}) + "\n")
    return per_task * len(shapes.GENEVAL_TAGS)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=["shapes"], help="what to evaluate")
    p.add_argument("--images", help="folder of PNGs to score")
    p.add_argument("--metadata", help="metadata JSONL (flat layout); default IMAGES/metadata.jsonl")
    p.add_argument("--results", help="write one JSON result per image here")
    p.add_argument("--write_gt", type=int, default=0, metavar="N", help="render N ground-truth images per task")
    p.add_argument("--out", help="output folder of --write_gt")
    p.add_argument("--resolution", type=int, default=64, help="image side of --write_gt")
    p.add_argument("--split", default="validation", help="shapes-world split of --write_gt")
    p.add_argument("--seed", type=int, default=0, help="seed of --write_gt")
    return p


def main(argv: list[str]) -> int:
    """Entry point; argv[0] is the program name."""
    from star_jax import shapes

    parser = _parser(argv[0] if argv else "star-jax eval")
    args = parser.parse_args(argv[1:])
    if args.write_gt:
        if not args.out:
            parser.error("--write_gt needs --out DIR")
        n = write_ground_truth(args.out, args.write_gt, resolution=args.resolution, split=args.split, seed=args.seed)
        print(f"wrote {n} images and metadata.jsonl to {args.out}")
        if not args.images:
            return 0
    if not args.images:
        parser.error("--images DIR is required (or --write_gt N --out DIR)")
    try:
        results = score_folder(args.images, args.metadata)
    except (OSError, ValueError) as e:
        print(f"{argv[0] if argv else 'star-jax eval'}: {e}", file=sys.stderr)
        return 2
    if args.results:
        with open(args.results, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(shapes.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
