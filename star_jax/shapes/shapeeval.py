"""ShapeEval: GenEval's per-image logic with an exact, detector-free detector for the shapes world.

Detection: pixels whose luminance differs from the background's (the median of the image border)
are candidates; each connected blob larger than 0.4 % of the image is cut again at half of its own
contrast, which puts the edge where it was before blur or compression. An object's class is the
shape template (placed by the blob's area and centroid) with the highest IoU; its colour is
the palette colour nearest to the median of its template's core; its score (GenEval's detector
confidence, used for ordering) is that IoU.

A blob is an object only when it is one of the world's objects, drawn cleanly: its template fits
with IoU >= MIN_FIT, its fitted side is at least MIN_SIDE of the image (0.7 of the world's smallest
object), and the median colour of its template's core lies within COLOR_TOLERANCE of a palette
colour (a third of the smallest distance between two palette colours). Any other blob is a
fragment. An image is a clean scene when it has no fragment and at most MAX_UNEXPLAINED of its
pixels are solid foreground (luminance contrast >= SOLID_CONTRAST, which every palette colour has)
outside the objects' templates widened by a 2-pixel band (at 64 px) for blur. An image that is not
a clean scene fails every prompt (`evaluate_image` names the rule): scattered colour fragments,
noise and VQ decodes of random codes must not pass a prompt by containing one blob that happens to
look like its object.

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
from star_jax.shapes.scene import (
    COLORS,
    DEFAULT_WORLD,
    RELATIONS,
    SHAPES,
    check_color,
    check_relation,
    check_shape,
    relative_position,
)

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CANDIDATE_CONTRAST = 20.0  # luminance difference from the background that makes a candidate pixel
MIN_AREA_FRACTION = 0.004  # smaller components are noise
# Clean-scene rules (module docstring). Calibrated on 64 px renders, VQ round trips of them, VQ
# decodes of random codes and an untrained stack's samples: fits of round trips >= 0.79, of
# random-code blobs 0.80 at the median; core colours of round trips <= 25 from the palette.
MIN_FIT = 0.75  # template IoU below which a blob is a fragment, not an object
MIN_SIDE = 0.7 * DEFAULT_WORLD.min_size  # fitted side, as a fraction of the image side
COLOR_TOLERANCE = 32.0  # RGB distance of the core's median colour to the nearest palette colour
SOLID_CONTRAST = 40.0  # luminance contrast of a palette colour's pixel (every colour has >= 40)
MAX_UNEXPLAINED = 0.005  # solid foreground pixels outside the objects' templates, fraction of the image
CORE = 0.6  # the core of a template: the shape scaled by this about its centre

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


@dataclasses.dataclass(frozen=True)
class SceneAnalysis:
    """What `analyse` found in one image.

    objects: the detections that pass every object rule, highest score first.
    fragments: one line per blob that is not an object (where, why).
    unexplained: fraction of the image's pixels that are solid foreground outside the objects.
    """

    objects: list[Detection]
    fragments: list[str]
    unexplained: float

    @property
    def clean(self) -> bool:
        """A clean scene: no fragment, and (almost) all foreground explained by the objects."""
        return not self.fragments and self.unexplained <= MAX_UNEXPLAINED

    def reason(self) -> str:
        """Why the image is not a clean scene ('' when it is)."""
        why = []
        if self.fragments:
            why.append(f"{len(self.fragments)} fragment(s): " + "; ".join(self.fragments[:3]))
        if self.unexplained > MAX_UNEXPLAINED:
            why.append(
                f"{self.unexplained:.1%} of the image is foreground outside the objects (limit {MAX_UNEXPLAINED:.1%})"
            )
        return "not a clean scene: " + ", ".join(why) if why else ""


def _template(shape: str, box: tuple[float, float, float, float], height: int, width: int, scale: float = 1.0):
    """[height, width] bool: pixels whose centres lie inside `shape` fitted to `box` (pixels), scaled about its centre."""
    x0, y0, x1, y1 = box
    half = (x1 - x0) / 2 * scale
    u = (np.arange(width) + 0.5 - (x0 + x1) / 2) / half
    v = (np.arange(height) + 0.5 - (y0 + y1) / 2) / half
    return shape_mask(shape, u[None, :], v[:, None])


def analyse(image) -> SceneAnalysis:
    """Objects, fragments and unexplained foreground of a shapes-world image.

    Two passes on luminance contrast |Y - Y_background|: a low threshold finds candidate blobs;
    each blob is then cut at half of its own contrast (the edge of a blurred or compressed shape)
    and checked against the object rules (module docstring).
    image: [H, W, 3] uint8 RGB.
    """
    image = as_image(image)
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    contrast = np.abs((pixels - background) @ _LUMA)
    labels, _ = ndimage.label(contrast > CANDIDATE_CONTRAST)
    height, width = contrast.shape
    min_area = MIN_AREA_FRACTION * height * width
    found, fragments = [], []
    explained = np.zeros((height, width), bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or np.count_nonzero(labels[box] == index) < min_area:
            continue  # specks: left to the unexplained-foreground rule
        where = f"at ({(box[1].start + box[1].stop) / 2:.0f}, {(box[0].start + box[0].stop) / 2:.0f})"
        # Re-cut the blob (plus a 2-pixel ring) at half of its contrast; keep its largest piece.
        rows = slice(max(box[0].start - 2, 0), min(box[0].stop + 2, height))
        cols = slice(max(box[1].start - 2, 0), min(box[1].stop + 2, width))
        local = contrast[rows, cols]
        level = np.percentile(local[labels[rows, cols] == index], 90)
        pieces, n = ndimage.label((local > level / 2) & (labels[rows, cols] == index))
        sizes = ndimage.sum_labels(np.ones_like(local), pieces, index=np.arange(1, n + 1)) if n else [0]
        if n == 0 or max(sizes) < min_area:
            fragments.append(f"{where}: no solid part")
            continue
        piece = pieces == 1 + int(np.argmax(sizes))
        sub = ndimage.find_objects(piece.astype(np.int32))[0]
        mask = ndimage.binary_fill_holes(piece[sub])
        shape, score, (bx0, by0, bx1, by1) = _classify(mask)
        x0, y0 = cols.start + sub[1].start, rows.start + sub[0].start
        fitted = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
        core = _template(shape, fitted, height, width, CORE)
        if np.count_nonzero(core) < 3:
            core = _template(shape, fitted, height, width)
        color = np.median(pixels[core], axis=0) if core.any() else background
        distances = np.linalg.norm(_PALETTE - color, axis=-1)
        name = _PALETTE_NAMES[int(np.argmin(distances))]
        side = (fitted[2] - fitted[0]) / width
        if score < MIN_FIT:
            fragments.append(f"{where}: fits no shape (best {shape}, IoU {score:.2f} < {MIN_FIT})")
        elif side < MIN_SIDE:
            fragments.append(f"{where}: {shape} of side {side:.2f} < {MIN_SIDE:.3f} of the image")
        elif distances.min() > COLOR_TOLERANCE:
            fragments.append(f"{where}: colour {np.round(color).astype(int).tolist()} is no palette colour")
        else:
            found.append(Detection(shape, name, fitted, score, int(np.count_nonzero(mask))))
            explained |= _template(shape, fitted, height, width)
    band = max(1, round(2 * max(height, width) / 64))  # blur around an object's edge, in pixels
    explained = ndimage.binary_dilation(explained, iterations=band)
    unexplained = np.count_nonzero((contrast >= SOLID_CONTRAST) & ~explained) / (height * width)
    return SceneAnalysis(sorted(found, key=lambda d: -d.score), fragments, float(unexplained))


def detect(image) -> list[Detection]:
    """The objects of a shapes-world image (`analyse(image).objects`), highest score first.

    image: [H, W, 3] uint8 RGB. Returns a list of Detection; fragments are not listed.
    """
    return analyse(image).objects


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
      RELATIONS. Returns (correct, reason); an image that is not a clean scene (`analyse`) is wrong
      whatever it contains. Raises ValueError naming the bad field and value.
    """
    image = as_image(image)
    _check_metadata(metadata)
    scene = analyse(image)
    if not scene.clean:
        return False, scene.reason()
    return evaluate_detections(scene.objects, metadata)


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
    "SceneAnalysis",
    "analyse",
    "detect",
    "evaluate_detections",
    "evaluate_image",
    "format_table",
    "summarize",
]
