"""`star-jax eval shapes`: score a folder of shapes-world images with ShapeEval and print GenEval's table.
`star-jax eval qa`: shapes-world QA accuracy per question type of a trained base, with its control.

  star-jax eval shapes --images DIR [--metadata FILE] [--results FILE] [--workdir W] [--controls 48]
  star-jax eval shapes --write_gt N --out DIR [--resolution 64] [--split validation] [--seed 0]
  star-jax eval qa --workdir W [--stage understanding] [--num 480] [--split validation] [--seed 0]

`eval qa` asks `--num` questions of the split (exact match on the answer) with the right images,
then the same questions about another scene's image: the control, what the base answers from priors.

Folder layouts read:
- flat: PNGs in DIR and a metadata JSONL (`--metadata`, default DIR/metadata.jsonl), one GenEval
  metadata object per line; its "filename" names the image (default: the line number, `00000.png`);
- GenEval's: DIR/<00000>/metadata.jsonl (one object) with the images in DIR/<00000>/samples/*.png.
`--write_gt` renders N ground-truth images per GenEval task in the flat layout, to demonstrate.

Every `eval shapes` table ends with control rows, ShapeEval of images that must fail, scored against
the first `--controls` metadata of the folder: scattered palette-coloured fragments at the images'
size, and, with `--workdir W` (a run with a generation or editing stage), VQ decodes of uniformly
random codes through W's VQ and the samples of W's stack untrained (its generation stage's start),
drawn at `--cfg`. A control above 0.05 means the scores cannot be trusted.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
from absl import flags
from PIL import Image

from star_jax import images as image_lib
from star_jax import init_sources, shapes, stages
from star_jax.cli import common
from star_jax.decode import runner as runner_lib
from star_jax.eval import shapes_world
from star_jax.shapes import captions


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
    results = []
    for path, meta in list_images(images, metadata):
        meta = {k: v for k, v in meta.items() if k != "filename"}
        image = image_lib.load_image(path, name=path)
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
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for tag in shapes.GENEVAL_TAGS:
            for i in range(per_task):
                ex = shapes.make_example(split, i, "pair", seed=seed, resolution=resolution, tag=tag)
                name = f"{tag}_{i:05d}.png"
                Image.fromarray(ex["image"]).save(os.path.join(out, name))
                f.write(json.dumps({**ex["metadata"], "filename": name}) + "\n")
    return per_task * len(shapes.GENEVAL_TAGS)


def control_rows(
    items: list[tuple[str, dict]], *, num: int, resolution: int, workdir: str | None, cfg: float, seed: int = 0
) -> dict[str, dict]:
    """ShapeEval summaries of the controls (module docstring) on the metadata of the first `num`
    items: {"fragments", and with `workdir` "random_codes", "untrained_stack"} -> summarize(...)."""
    metas = [{k: v for k, v in meta.items() if k != "filename"} for _, meta in items[:num]]
    out = {"fragments": shapes_world.score(shapes_world.fragment_images(len(metas), resolution, seed), metas)}
    if workdir is not None:
        runner = runner_lib.StarRunner(*init_sources.load_workdir(workdir, ("editing", "generation"))[:2])
        decode, size = runner.decode_codes, runner.model.vq_cfg.codebook_size
        codes = shapes_world.random_code_images(decode, size, runner.num_tokens, len(metas), seed)
        out["random_codes"] = shapes_world.score(codes, metas)
        fresh = shapes_world.untrained_stack(runner, seed)
        prompts = [m.get("prompt", "") for m in metas]
        images = np.concatenate(
            [fresh.text_to_image(prompts[i : i + 16], cfg=cfg, seed=seed + i)[0] for i in range(0, len(prompts), 16)]
        )
        out["untrained_stack"] = shapes_world.score(images, metas)
    return {k: v["summary"] for k, v in out.items()}


def format_controls(controls: dict[str, dict]) -> str:
    """The control rows printed under GenEval's table."""
    titles = {
        "fragments": "scattered palette fragments",
        "random_codes": "VQ decodes of random codes",
        "untrained_stack": "untrained stack's samples",
    }
    lines = ["", f"Controls (must be <= {shapes_world.CONTROL_LIMIT})", "========"]
    for key, summary in controls.items():
        flag = "" if summary["overall"] <= shapes_world.CONTROL_LIMIT else "  <- the scorer passes noise"
        lines.append(f"{titles[key]:<28} = {summary['overall']:.5f} ({summary['images']} images){flag}")
    return "\n".join(lines)


def question_answering(workdir: str, *, stage: str, num: int, split: str, seed: int) -> dict:
    """QA of `stage`'s checkpoint in `workdir`:
    {"per_kind": {kind: {"accuracy", "control", "n"}}, "overall", "control"}."""
    runner = runner_lib.StarRunner(*init_sources.load_workdir(workdir, (stage,))[:2])
    real = shapes_world.understanding(runner, num=num, split=split, seed=seed)
    control = shapes_world.understanding(runner, num=num, split=split, seed=seed, shuffle_images=True)
    counts = collections.Counter(real["kinds"])
    per_kind = {
        k: {"accuracy": v, "control": control["per_kind"][k], "n": counts[k]} for k, v in real["per_kind"].items()
    }
    return {
        "per_kind": per_kind,
        "overall": real["overall"],
        "control": control["overall"],
        "per_form": answers_by_form(real["answers"]),
        "reasoning": real["reasoning"],
    }


def answers_by_form(answers: list[tuple[str, str, str]], top: int = 3) -> dict:
    """(question, answer, prediction) triples grouped by `captions.question_form`: {form: {"n",
    "accuracy", "answers": the `top` most common true answers, "predictions": the `top` most common
    predictions, each [[text, count], ...]}}. Shows what a base answers from priors (one
    prediction for every question of a form) and what it reads from the image. Predictions are
    final answers (`captions.final_answer`), without any reasoning before them."""
    groups = collections.defaultdict(list)
    for q, a, p in answers:
        groups[captions.question_form(q)].append((a.strip(), captions.final_answer(p)))
    common = lambda xs: [list(x) for x in collections.Counter(xs).most_common(top)]  # noqa: E731
    return {
        form: {
            "n": len(v),
            "accuracy": float(np.mean([a == p for a, p in v])),
            "answers": common(a for a, _ in v),
            "predictions": common(p for _, p in v),
        }
        for form, v in sorted(groups.items())
    }


def format_qa(result: dict) -> str:
    """A markdown table of `question_answering`'s result."""
    lines = ["| question | n | accuracy | control |", "|---|---|---|---|"]
    for kind, r in result["per_kind"].items():
        lines.append(f"| {kind} | {r['n']} | {r['accuracy']:.3f} | {r['control']:.3f} |")
    n = sum(r["n"] for r in result["per_kind"].values())
    lines.append(f"| overall | {n} | {result['overall']:.3f} | {result['control']:.3f} |")
    if result.get("reasoning"):
        r = result["reasoning"]
        lines += [
            "",
            f"Reasoned position replies: {r['replies']}; both points exact {r['points_exact']:.3f}, "
            f"within one tenth {r['points_within_one']:.3f}.",
        ]
    if result.get("per_form"):
        lines += [
            "",
            "| question form | n | accuracy | most common answers | most common predictions |",
            "|---|---|---|---|---|",
        ]
        show = lambda xs: ", ".join(f"{text!r} {count}" for text, count in xs)  # noqa: E731
        for form, r in result["per_form"].items():
            lines.append(
                f"| {form} | {r['n']} | {r['accuracy']:.3f} | {show(r['answers'])} | {show(r['predictions'])} |"
            )
    return "\n".join(lines)


def _qa_main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "a run's workdir", flag_values=fv)
    flags.DEFINE_string(
        "stage", "understanding", "whose checkpoint answers (understanding, generation, editing)", flag_values=fv
    )
    flags.DEFINE_integer("num", 480, "questions", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("split", "validation", "shapes-world split of the questions", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "which questions of the split", flag_values=fv)
    flags.DEFINE_string("results", None, "write the result as JSON here", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    if fv.stage not in stages.names():
        common.usage_error(prog, f"--stage {fv.stage!r} is not a stage; known: {', '.join(stages.names())}")
    if not os.path.isdir(fv.workdir):
        return common.error(prog, f"--workdir {fv.workdir!r} does not exist")
    try:
        result = question_answering(fv.workdir, stage=fv.stage, num=fv.num, split=fv.split, seed=fv.seed)
    except init_sources.WorkdirError as e:
        return common.error(prog, e)
    common.log_to(os.path.join(fv.workdir, "star_jax.log"))
    if fv.results:
        with open(fv.results, "w") as f:
            json.dump(result, f, indent=1)
    print(format_qa(result))
    return 0


def _shapes_main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("images", None, "folder of PNGs to score", flag_values=fv)
    flags.DEFINE_string("metadata", None, "metadata JSONL (flat layout); default IMAGES/metadata.jsonl", flag_values=fv)
    flags.DEFINE_string("results", None, "write one JSON result per image here", flag_values=fv)
    flags.DEFINE_integer("write_gt", 0, "render N ground-truth images per task", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("out", None, "output folder of --write_gt", flag_values=fv)
    flags.DEFINE_integer("resolution", 64, "image side of --write_gt", flag_values=fv)
    flags.DEFINE_string("split", "validation", "shapes-world split of --write_gt", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of --write_gt", flag_values=fv)
    flags.DEFINE_integer("controls", 48, "images per control row (0: none)", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("workdir", None, "a run whose VQ and stack give the model control rows", flag_values=fv)
    flags.DEFINE_float("cfg", 20.0, "guidance of the untrained-stack control", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0]
    if fv.workdir is not None and not os.path.isdir(fv.workdir):
        return common.error(prog, f"--workdir {fv.workdir!r} does not exist")
    if fv.write_gt:
        if not fv.out:
            common.usage_error(prog, "--write_gt needs --out DIR")
        n = write_ground_truth(fv.out, fv.write_gt, resolution=fv.resolution, split=fv.split, seed=fv.seed)
        print(f"wrote {n} images and metadata.jsonl to {fv.out}")
        if not fv.images:
            return 0
    if not fv.images:
        common.usage_error(prog, "--images DIR is required (or --write_gt N --out DIR)")
    try:
        results = score_folder(fv.images, fv.metadata)
        items = list_images(fv.images, fv.metadata)
        first = image_lib.load_image(items[0][0], name=items[0][0])
        controls = {}
        if fv.controls:
            controls = control_rows(
                items, num=fv.controls, resolution=first.shape[0], workdir=fv.workdir, cfg=fv.cfg, seed=fv.seed
            )
    except (OSError, ValueError, init_sources.WorkdirError) as e:
        return common.error(prog, e)
    if fv.results:
        with open(fv.results, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(shapes.format_table(results) + (format_controls(controls) if controls else ""))
    return 0


SUBCOMMANDS: common.Subcommands = {
    "shapes": (_shapes_main, "score a folder of shapes-world images with ShapeEval (GenEval's table)"),
    "qa": (_qa_main, "shapes-world QA accuracy of a trained base, with its shuffled-image control"),
}


def main(argv: list[str]) -> int:
    """Entry point; argv[0] is the program name."""
    return common.dispatch(argv, SUBCOMMANDS, __doc__)
