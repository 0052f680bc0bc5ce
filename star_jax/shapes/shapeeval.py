"""ShapeEval: GenEval's per-image logic with an exact, detector-free detector for the shapes world.

Detection: pixels whose luminance differs from the background's (the median of the image border)
are candidates; each connected blob larger than 0.4 % of the image is cut again at half of its own
contrast, which puts the edge where it was before blur or compression. An object's class is the
shape template (placed by the blob's area and centroid) with the highest IoU; its colour is
the palette colour nearest to the median of its eroded interior; its score (GenEval's detector
confidence, used for ordering) is that IoU. Components that match no template (IoU < 0.5) are
dropped, as a detector would miss them.

Scoring is a port of GenEval's `evaluate` (evaluation/evaluate_images.py): includes are ANDed,
excludes ORed; `count` is "at least" for includes and "fewer than" for excludes; colours and
positions are checked on the first `count` objects of a class; the position rule is GenEval's
`relative_position` with POSITION_THRESHOLD 0.1. The summary follows its `summary_scores.py`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from star_jax.shapes.render import shape_mask
from star_jax.shapes.scene import COLORS, RELATIONS, SHAPES, check_color, check_relation, check_shape, relative_position

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CANDIDATE_CONTRAST = 20.0  # luminance difference from the background that makes a candidate pixel
MIN_AREA_FRACTION = 0.004  # smaller components are noise
MIN_SCORE = 0.5  # template IoU below which a component is not an object

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as in JPEG


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detected object: class (shape), colour, box [x0, y0, x1, y1] in pixels, score (template IoU), area in pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    score: float
    area: int


def as_image(image) -> np.ndarray:
    """Validate an image: a [H, W, 3] uint8 array (a PIL image is converted). Raises ValueError otherwise."""
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image: expected a [H, W, 3] uint8 numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"image: expected shape [H, W, 3] with H, W >= 8, got {list(image.shape)}")
    return image


# Per shape: area as a fraction of its bounding box, and the centroid's offset below the box centre
# (in half sides). Together they place a shape's template on a blob from its area and centroid alone,
# which thin tips lost to blur or compression barely move.
_AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0, "cross": 0.0}


def _classify(mask: np.ndarray) -> tuple[str, float, tuple[float, float, float, float]]:
    """Best shape template for a blob.

    mask: [h, w] bool, the blob cropped to its bounding box. Returns (shape, IoU, fitted box
    (x0, y0, x1, y1) in the crop's pixel units).
    """
    area = float(np.count_nonzero(mask))
    ys, xs = np.nonzero(mask)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5  # centroid in continuous pixel coordinates
    pad = int(np.ceil(0.5 * np.sqrt(area))) + 1
    grid = np.pad(mask, pad)
    x = np.arange(grid.shape[1]) + 0.5 - pad
    y = np.arange(grid.shape[0]) + 0.5 - pad
    best = (SHAPES[0], -1.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        half = np.sqrt(area / _AREA_FRACTION[shape]) / 2
        cy = my - _CENTROID_OFFSET[shape] * half
        template = shape_mask(shape, (x[None, :] - mx) / half, (y[:, None] - cy) / half)
        iou = np.count_nonzero(template & grid) / max(np.count_nonzero(template | grid), 1)
        if iou > best[1]:
            best = (shape, float(iou), (mx - half, cy - half, mx + half, cy + half))
    return best


def detect(image) -> list[Detection]:
    """Objects in a shapes-world image, highest score first.

    Two passes on luminance contrast |Y - Y_background|: a low threshold finds candidate blobs;
    each blob is then cut at half of its own contrast (the edge of a blurred or compressed shape).
    image: [H, W, 3] uint8 RGB. Returns a list of Detection.
    """
    image = as_image(image)
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    contrast = np.abs((pixels - background) @ _LUMA)
    labels, _ = ndimage.label(contrast > CANDIDATE_CONTRAST)
    height, width = contrast.shape
    min_area = MIN_AREA_FRACTION * height * width
    found = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or np.count_nonzero(labels[box] == index) < min_area:
            continue
        # Re-cut the blob (plus a 2-pixel ring) at half of its contrast; keep its largest piece.
        rows = slice(max(box[0].start - 2, 0), min(box[0].stop + 2, height))
        cols = slice(max(box[1].start - 2, 0), min(box[1].stop + 2, width))
        local = contrast[rows, cols]
        level = np.percentile(local[labels[rows, cols] == index], 90)
        pieces, n = ndimage.label((local > level / 2) & (labels[rows, cols] == index))
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(local), pieces, index=np.arange(1, n + 1))
        piece = pieces == 1 + int(np.argmax(sizes))
        sub = ndimage.find_objects(piece.astype(np.int32))[0]
        mask = ndimage.binary_fill_holes(piece[sub])
        area = int(np.count_nonzero(mask))
        if area < min_area:
            continue
        shape, score, (bx0, by0, bx1, by1) = _classify(mask)
        if score < MIN_SCORE:
            continue
        interior = ndimage.binary_erosion(mask)
        if np.count_nonzero(interior) < 4:
            interior = mask
        color = np.median(pixels[rows, cols][sub][interior], axis=0)
        name = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - color, axis=-1)))]
        x0, y0 = cols.start + sub[1].start, rows.start + sub[0].start
        found.append(Detection(shape, name, (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1), score, area))
    return sorted(found, key=lambda d: -d.score)


def _check_metadata(metadata) -> None:
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata: expected a dict, got {type(metadata).__name__}")
    includes = metadata.get("include", [])
    for field in ("include", "exclude"):
        reqs = metadata.get(field, [])
        if not isinstance(reqs, list | tuple):
            raise ValueError(f"metadata.{field}: expected a list, got {reqs!r}")
        for i, req in enumerate(reqs):
            where = f"metadata.{field}[{i}]"
            if not isinstance(req, Mapping):
                raise ValueError(f"{where}: expected a dict, got {req!r}")
            check_shape(req.get("class"), f"{where}.class")
            count = req.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{where}.count: expected an integer >= 1, got {count!r}")
            if "color" in req:
                check_color(req["color"], f"{where}.color")
            if "position" in req:
                if field == "exclude":
                    raise ValueError(f"{where}.position: not allowed in an exclude")
                pos = req["position"]
                if not isinstance(pos, list | tuple) or len(pos) != 2:
                    raise ValueError(f"{where}.position: expected [relation, target_index], got {pos!r}")
                check_relation(pos[0], f"{where}.position")
                if not isinstance(pos[1], int) or not 0 <= pos[1] < i or pos[1] >= len(includes):
                    raise ValueError(f"{where}.position: target index {pos[1]!r} must name an earlier include")


def evaluate_detections(detections: list[Detection], metadata: Mapping) -> tuple[bool, str]:
    """GenEval's `evaluate` on detections (sorted by score). Returns (correct, reason); reason is '' when correct."""
    _check_metadata(metadata)
    objects: dict[str, list[Detection]] = {}
    for det in detections:
        objects.setdefault(det.shape, []).append(det)
    correct, reason, matched_groups = True, [], []
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        matched = True
        found = objects.get(classname, [])[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={count}, found {colors.count(req['color'])} "
                        f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj.box, target.box)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def evaluate_image(image, metadata: Mapping) -> tuple[bool, str]:
    """Score one image against GenEval metadata.

    image: [H, W, 3] uint8 RGB (or a PIL image).
    metadata: {"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
      "exclude": [{"class", "count"}], "prompt"}; classes in SHAPES, colours in COLORS, relations in
      RELATIONS. Returns (correct, reason). Raises ValueError naming the bad field and value.
    """
    image = as_image(image)
    _check_metadata(metadata)
    return evaluate_detections(detect(image), metadata)


def summarize(results: Iterable[Mapping]) -> dict:
    """Accuracies of scored images, each {"tag", "correct", "prompt"?, "metadata"?}.

    Returns {"images", "prompts", "image_accuracy", "prompt_accuracy", "tasks": {tag: (accuracy, correct, total)},
    "overall"}: overall is the mean over the GenEval tags present (other tags are listed, not averaged).
    """
    results = list(results)
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for r in results:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r.get("metadata") or r.get("prompt") or json.dumps(r.get("tag"))
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        by_prompt[key] = by_prompt.get(key, False) or bool(r["correct"])
    tasks = {t: (float(np.mean(v)), int(np.sum(v)), len(v)) for t, v in by_tag.items()}
    geneval = [tasks[t][0] for t in GENEVAL_TAGS if t in tasks]
    return {
        "images": len(results),
        "prompts": len(by_prompt),
        "image_accuracy": float(np.mean([r["correct"] for r in results])) if results else 0.0,
        "prompt_accuracy": float(np.mean(list(by_prompt.values()))) if results else 0.0,
        "tasks": tasks,
        "overall": float(np.mean(geneval)) if geneval else 0.0,
    }


def format_table(results: Iterable[Mapping]) -> str:
    """GenEval's summary table (summary_scores.py) for scored images."""
    s = summarize(results)
    lines = [
        "Summary",
        "=======",
        f"Total images: {s['images']}",
        f"Total prompts: {s['prompts']}",
        f"% correct images: {s['image_accuracy']:.2%}",
        f"% correct prompts: {s['prompt_accuracy']:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    order = [t for t in GENEVAL_TAGS if t in s["tasks"]] + [t for t in s["tasks"] if t not in GENEVAL_TAGS]
    for tag in order:
        acc, n_correct, total = s["tasks"][tag]
        lines.append(f"{tag:<16} = {acc:.2%} ({n_correct} / {total})")
    lines += ["", f"Overall score (avg. over tasks): {s['overall']:.5f}"]
    return "\n".join(lines)


__all__ = [
    "GENEVAL_TAGS",
    "RELATIONS",
    "Detection",
    "detect",
    "evaluate_detections",
    "evaluate_image",
    "format_table",
    "summarize",
]
