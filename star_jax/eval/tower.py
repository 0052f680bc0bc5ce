"""What a vision tower knows, read by the vision stage's own heads, without the decoder.

The vision stage trains the ViT with per-token scene heads (`cell_head`: the shape, colour and
centre of the object a merged token belongs to; `relation_head` with data.scene_relations: which
objects stand in which relation to it; `count_head` with data.scene_counts: how many objects the
scene, and the object's kind, have). Read on validation scenes they say what the tower's output
tokens (the tokens the decoder sees) carry, and read after the understanding stage, with the
vision stage's heads on the later tower, how much of it the joint stage kept:

  star-jax eval tower --workdir W [--tower understanding]

Position questions ("is A left of B?", "where is A relative to B?") are answered from the bits of
B's tokens that name A (`input_pipeline.object_relations`): the answer a reader of the tower gets
without any reasoning of its own.
"""

from __future__ import annotations

import re

import numpy as np

from star_jax import input_pipeline, shapes
from star_jax.shapes import scene as scene_lib

_YES_NO = re.compile(r"is (the .+?) (left of|right of|above|below) (the .+)\?$")
_WHERE = re.compile(r"where is (the .+?) relative to (the .+)\?$")


def _resolve(scene, reference: str, question: str) -> int:
    words = reference.split()[1:]
    found = [
        k for k, o in enumerate(scene.objects) if o.shape == words[-1] and (len(words) == 1 or o.color == words[0])
    ]
    if len(found) != 1:
        raise ValueError(f"question {question!r}: {reference!r} names {len(found)} objects of its scene, not one")
    return found[0]


def position_question_parts(scene, question: str) -> tuple[int, str | None, int]:
    """(a, relation, b) of a shapes-world position question about `scene`: a, b index
    scene.objects; relation is one of shapes.RELATIONS for "is A <relation> B?" and None for
    "where is A relative to B?". Raises ValueError for any other question."""
    m = _YES_NO.match(question)
    if m:
        return _resolve(scene, m.group(1), question), m.group(2), _resolve(scene, m.group(3), question)
    m = _WHERE.match(question)
    if m:
        return _resolve(scene, m.group(1), question), None, _resolve(scene, m.group(2), question)
    raise ValueError(f"question {question!r} is not a shapes-world position question")


def position_answer_from_bits(relation_logits: np.ndarray, owner: np.ndarray, scene, question: str) -> str | None:
    """The answer the relation bits give to a position question about one image.

    relation_logits: [N, R, S, C] float (N merged tokens; R, S, C = shapes RELATIONS, SHAPES,
    COLORS); owner: [N] int, the object each token belongs to (`input_pipeline.scene_cell_objects`),
    -1 for none. The logits of the bits (relation, A's shape, A's colour) are averaged over B's
    tokens: "yes" / "no" by the sign of the asked relation's, or the relation with the largest.
    None when no token belongs to B.
    """
    a, relation, b = position_question_parts(scene, question)
    cells = np.flatnonzero(owner == b)
    if not len(cells):
        return None
    obj = scene.objects[a]
    bits = relation_logits[cells].mean(0)[:, scene_lib.SHAPES.index(obj.shape), list(scene_lib.COLORS).index(obj.color)]
    if relation is None:
        return scene_lib.RELATIONS[int(np.argmax(bits))]
    return "yes" if bits[scene_lib.RELATIONS.index(relation)] > 0 else "no"


def scene_objects(scene) -> list[list]:
    """A scene's objects as the input pipeline's [[shape, colour, x, y, size], ...]."""
    return [[o.shape, o.color, o.x, o.y, o.size] for o in scene.objects]


def count_answer_from_heads(count_logits: np.ndarray, owner: np.ndarray, scene, question: str) -> str:
    """The answer the count head gives to a shapes-world count question about one image, read at
    the tokens of the objects it asks about (the lookup is given: these are the true objects').

    count_logits: [N, 3, M + 1] float (scene count, same-shape count, same-kind count); owner: [N]
    int as in `position_answer_from_bits`. "how many objects": the scene count's mean logits over
    every token; "how many (<colour>) <shape>s": the matching count's mean over the tokens of the
    objects of that kind ("zero" when the scene has none, or none owns a token).
    """
    from star_jax.shapes import captions

    if question == "how many objects are there?":
        return captions.NUMBERS[int(np.argmax(count_logits[:, 0].mean(0)))]
    m = re.fullmatch(r"how many (?:(\w+) )?(\w+) are there\?", question)
    if not m:
        raise ValueError(f"question {question!r} is not a shapes-world count question")
    color, noun = m.groups()
    kinds = [
        k
        for k, o in enumerate(scene.objects)
        if captions.make_plural(o.shape) == noun and (color is None or o.color == color)
    ]
    cells = np.flatnonzero(np.isin(owner, kinds))
    if not len(cells):
        return "zero"
    return captions.NUMBERS[int(np.argmax(count_logits[cells, 1 if color is None else 2].mean(0)))]


def score(outputs: dict[str, np.ndarray], examples: list[dict], *, cover: bool) -> dict:
    """Scores the vision heads' outputs on shapes-world QA examples (`shapes.make_example(.., "qa")`).

    outputs (`Star.cell_logits`, one row per example): "shape" [B, N, S + 1], "color"
    [B, N, C + 1] logits (class 0 = none), "centre" [B, N, 2] (cells), "relations" [B, N, R * S * C]
    logits (zero width without relations), "counts" [B, N, 3, M + 1] logits (3 = 0 without counts);
    cover: the labelling (data.vision_labels == "scene_cover").
    Returns {"cells": labelled cells, "shape_accuracy", "color_accuracy", "centre_error" (mean abs,
    cells); with relations "relation_recall", "relation_precision" (bits labelled -1 not counted),
    "position": {"yes_no": [n, accuracy], "where": [n, accuracy], "overall": accuracy,
    "unanswered": questions whose B owns no token (scored wrong)}; with counts
    "scene_count_accuracy" (every cell), "object_count_accuracy" (labelled cells, both counts),
    "count": {question form: [n, accuracy of `count_answer_from_heads`]}}.
    """
    from star_jax.shapes import captions

    num_tokens = outputs["shape"].shape[1]
    grid = int(round(np.sqrt(num_tokens)))
    if grid * grid != num_tokens:
        raise ValueError(f"{num_tokens} merged tokens per image: not a square grid")
    has_relations = outputs["relations"].shape[-1] > 0
    has_counts = outputs["counts"].shape[2] > 0
    shape_ok, color_ok, centre_err, scene_count_ok, object_count_ok = [], [], [], [], []
    tp = predicted = truth = 0
    asked = {"yes_no": [], "where": []}
    counted: dict[str, list[bool]] = {}
    unanswered = 0
    dims = (len(scene_lib.RELATIONS), len(scene_lib.SHAPES), len(scene_lib.COLORS))
    for i, ex in enumerate(examples):
        objects = scene_objects(ex["scene"])
        t = input_pipeline.scene_cell_targets(objects, grid, cover=cover, relations=has_relations, counts=has_counts)
        owner = input_pipeline.scene_cell_objects(objects, grid, cover=cover)
        labelled = t["cell_shape"] > 0
        shape_ok.append(np.argmax(outputs["shape"][i], -1)[labelled] == t["cell_shape"][labelled])
        color_ok.append(np.argmax(outputs["color"][i], -1)[labelled] == t["cell_color"][labelled])
        centre_err.append(np.abs(outputs["centre"][i][labelled] - t["cell_centre"][labelled]).ravel())
        if has_counts:
            guess = np.argmax(outputs["counts"][i], -1)
            scene_count_ok.append(guess[:, 0] == t["cell_counts"][:, 0])
            object_count_ok.append((guess[:, 1:] == t["cell_counts"][:, 1:])[labelled].ravel())
            if ex["qa_kind"] == "count":
                answer = count_answer_from_heads(outputs["counts"][i], owner, ex["scene"], ex["question"])
                counted.setdefault(captions.question_form(ex["question"]), []).append(answer == ex["answer"])
        if not has_relations:
            continue
        labels, logits = t["cell_relations"][labelled], outputs["relations"][i][labelled]
        known, on, yes = labels >= 0, logits > 0, labels > 0.5
        tp += int(np.sum(on & yes))
        predicted += int(np.sum(on & known))
        truth += int(np.sum(yes))
        if ex["qa_kind"] != "position":
            continue
        relation_logits = outputs["relations"][i].reshape(num_tokens, *dims)
        answer = position_answer_from_bits(relation_logits, owner, ex["scene"], ex["question"])
        unanswered += answer is None
        kind = "where" if ex["question"].startswith("where") else "yes_no"
        asked[kind].append(answer == ex["answer"])
    result = {
        "cells": int(sum(len(x) for x in shape_ok)),
        "shape_accuracy": float(np.mean(np.concatenate(shape_ok))),
        "color_accuracy": float(np.mean(np.concatenate(color_ok))),
        "centre_error": float(np.mean(np.concatenate(centre_err))),
    }
    if has_relations:
        everything = asked["yes_no"] + asked["where"]
        result.update(
            relation_recall=tp / max(truth, 1),
            relation_precision=tp / max(predicted, 1),
            position={
                **{k: [len(v), float(np.mean(v)) if v else float("nan")] for k, v in asked.items()},
                "overall": float(np.mean(everything)) if everything else float("nan"),
                "unanswered": unanswered,
            },
        )
    if has_counts:
        result.update(
            scene_count_accuracy=float(np.mean(np.concatenate(scene_count_ok))),
            object_count_accuracy=float(np.mean(np.concatenate(object_count_ok))),
            count={form: [len(v), float(np.mean(v))] for form, v in sorted(counted.items())},
        )
    return result


def tower_outputs(model, config, images: np.ndarray, *, batch: int = 64) -> dict[str, np.ndarray]:
    """The vision heads on uint8 images [B, H, W, 3]: `score`'s outputs (float32 numpy). `model`
    is a vision-stage STAR (vision tower + cell_head, and relation_head with scene_relations)."""
    import jax.numpy as jnp

    from star_jax.decode import runner

    parts = []
    for start in range(0, len(images), batch):
        pixels, _, layout = runner.vit_inputs(model, config, images[start : start + batch])
        parts.append({k: np.asarray(v) for k, v in model.cell_logits({"pixels": jnp.asarray(pixels)}, layout).items()})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def load_tower(workdir: str, tower_stage: str | None = None):
    """(model, config): the vision stage of `workdir` with its heads; with `tower_stage` (e.g.
    "understanding") the tower's params are that stage's, read by the vision stage's heads."""
    from flax import nnx

    from star_jax import sharding, tasks
    from star_jax.decode import runner
    from star_jax.models import star

    found = runner.first_trained_stage(workdir, ("vision",))
    if found is None:
        raise runner.WorkdirError(f"--workdir {workdir!r} has no trained vision stage")
    _, config = found
    if config.data.get("vision_labels", "caption_words") not in ("scene_cells", "scene_cover"):
        raise runner.WorkdirError(
            f"--workdir {workdir!r}: its vision stage trained data.vision_labels="
            f"{config.data.get('vision_labels')!r}, which has no per-token scene heads"
        )
    mesh = sharding.single_device_mesh()
    model = sharding.create_sharded(
        lambda: star.build(config, "vision", rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES
    )
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        tasks.load_from_stage(model, workdir, "vision")
        if tower_stage:
            if runner.first_trained_stage(workdir, (tower_stage,)) is None:
                raise runner.WorkdirError(f"--workdir {workdir!r} has no trained {tower_stage} stage")
            loaded = tasks.load_from_stage(model, workdir, tower_stage)
            if not any(path.startswith("vision/") for path in loaded):
                raise runner.WorkdirError(f"stage {tower_stage!r} of {workdir!r} holds no vision tower")
    return model, config


def probe(
    workdir: str, *, tower_stage: str | None = None, num: int = 480, split: str = "validation", seed: int = 0
) -> dict:
    """`score` of the vision heads of `workdir` (tower from `tower_stage` if given) on the first
    `num` QA examples of `split`."""
    model, config = load_tower(workdir, tower_stage)
    examples = [shapes.make_example(split, i, "qa", seed=seed) for i in range(num)]
    outputs = tower_outputs(model, config, np.stack([e["image"] for e in examples]))
    return score(outputs, examples, cover=config.data.vision_labels == "scene_cover")


def format_probe(result: dict) -> str:
    """A markdown table of `score`'s result."""
    lines = [
        "| read by the vision heads | value |",
        "|---|---|",
        f"| labelled cells | {result['cells']} |",
        f"| shape accuracy | {result['shape_accuracy']:.3f} |",
        f"| colour accuracy | {result['color_accuracy']:.3f} |",
        f"| centre error (cells) | {result['centre_error']:.3f} |",
    ]
    if "position" in result:
        pos = result["position"]
        lines += [
            f"| relation recall / precision | {result['relation_recall']:.3f} / {result['relation_precision']:.3f} |",
            f"| position questions, yes / no ({pos['yes_no'][0]}) | {pos['yes_no'][1]:.3f} |",
            f"| position questions, where ({pos['where'][0]}) | {pos['where'][1]:.3f} |",
            f"| position questions, overall ({pos['unanswered']} unanswered) | {pos['overall']:.3f} |",
        ]
    if "count" in result:
        lines += [
            f"| scene count accuracy (every cell) | {result['scene_count_accuracy']:.3f} |",
            f"| object count accuracy (labelled cells) | {result['object_count_accuracy']:.3f} |",
        ]
        lines += [
            f"| {form} ({n}), read at its objects' tokens | {acc:.3f} |" for form, (n, acc) in result["count"].items()
        ]
    return "\n".join(lines)
