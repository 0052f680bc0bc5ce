"""Scenes of the shapes world: the vocabulary, the `Scene`/`Obj` dataclasses, geometry and the sampler.

A scene is resolution independent: object centres and sizes are fractions of the image side, so one
scene renders at 32, 64, 128 or 384 px. Every object's shape fits its square bounding box of side
`size`; bounding boxes never overlap and keep `WorldConfig.margin` between them (and half of it to
the border). Relations between objects are GenEval's (`relative_position` in its
`evaluation/evaluate_images.py`), computed here on the exact boxes.

Held-out (colour, shape) pairs and (shape, relation, shape) triples are set in `WorldConfig`; the
training splits never contain them, neither in a scene nor in any text about it (see `allowed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Vocabulary. Colours are far apart in RGB (>= 95) and every one differs from the background in
# luminance by >= 40 (JPEG keeps luminance at full resolution; ShapeEval segments on it).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 20, 20),
    "orange": (255, 160, 0),
    "yellow": (245, 235, 60),
    "green": (10, 120, 30),
    "blue": (30, 60, 220),
    "purple": (120, 30, 150),
    "pink": (255, 150, 220),
    "brown": (110, 60, 10),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)  # mid grey
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")


def check_color(value, field: str = "color") -> str:
    if value not in COLORS:
        raise ValueError(f"{field}: unknown colour {value!r}; expected one of {sorted(COLORS)}")
    return value


def check_shape(value, field: str = "class") -> str:
    if value not in SHAPES:
        raise ValueError(f"{field}: unknown shape {value!r}; expected one of {list(SHAPES)}")
    return value


def check_relation(value, field: str = "position") -> str:
    if value not in RELATIONS:
        raise ValueError(f"{field}: unknown relation {value!r}; expected one of {list(RELATIONS)}")
    return value


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: `shape` in SHAPES, `color` in COLORS, centre (x, y) and side `size` as fractions of the image."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def box(self) -> np.ndarray:
        """[4] float64 bounding box (x0, y0, x1, y1) in fractions of the image side."""
        h = self.size / 2
        return np.array([self.x - h, self.y - h, self.x + h, self.y + h])


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects on a plain background; `objects` are drawn in order (they never overlap)."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = BACKGROUND

    def replace(self, index: int, **changes) -> Scene:
        """A copy with object `index` changed (`shape`, `color`, `x`, `y`, `size`)."""
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)
        return Scene(tuple(objs), self.background)

    def without(self, index: int) -> Scene:
        """A copy without object `index`."""
        return Scene(self.objects[:index] + self.objects[index + 1 :], self.background)

    def with_object(self, obj: Obj) -> Scene:
        """A copy with `obj` appended."""
        return Scene(self.objects + (obj,), self.background)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sampling ranges and held-out combinations (fractions of the image side)."""

    min_size: float = 0.18
    max_size: float = 0.30
    margin: float = 0.06  # minimum gap between two bounding boxes; half of it to the border
    max_objects: int = 4
    heldout_pairs: tuple[tuple[str, str], ...] = (
        ("purple", "circle"),
        ("orange", "square"),
        ("green", "triangle"),
        ("pink", "diamond"),
        ("blue", "cross"),
    )
    # (shape_a, relation, shape_b): a is `relation` b; the inverse triple is held out with it.
    heldout_triples: tuple[tuple[str, str, str], ...] = (
        ("triangle", "above", "circle"),
        ("square", "left of", "diamond"),
    )

    def __post_init__(self):
        for color, shape in self.heldout_pairs:
            check_color(color, "heldout_pairs")
            check_shape(shape, "heldout_pairs")
        for a, rel, b in self.heldout_triples:
            check_shape(a, "heldout_triples")
            check_relation(rel, "heldout_triples")
            check_shape(b, "heldout_triples")

    @property
    def triples(self) -> frozenset[tuple[str, str, str]]:
        """Held-out triples together with their inverses (b, inverse(relation), a)."""
        return frozenset(self.heldout_triples) | {(b, INVERSE[r], a) for a, r, b in self.heldout_triples}


DEFAULT_WORLD = WorldConfig()


def relative_position(box_a, box_b, threshold: float = 0.1, cut: float = 0.5) -> set[str]:
    """GenEval's relation of box A to box B (its `relative_position`, POSITION_THRESHOLD = 0.1).

    The centre offset is shrunk by `threshold` x (sum of the two box sizes) per axis, then the
    shrunk offset divided by the length of the raw offset must pass `cut` (0.5) on an axis for its
    relation; an object can be both e.g. "left of" and "above". Image y grows downwards.
    box_*: [4] (x0, y0, x1, y1) in any one unit. Returns a subset of RELATIONS.
    """
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -cut:
        rels.add("left of")
    if dx > cut:
        rels.add("right of")
    if dy < -cut:
        rels.add("above")
    if dy > cut:
        rels.add("below")
    return rels


def clear_relations(a: Obj, b: Obj) -> set[str]:
    """Relations of a to b that hold with a safety margin (survive a few pixels of detection error)."""
    return relative_position(a.box, b.box, threshold=0.15, cut=0.6)


def unclear_relations(a: Obj, b: Obj) -> set[str]:
    """Relations of a to b that might hold under detection error (a superset of GenEval's)."""
    return relative_position(a.box, b.box, threshold=0.05, cut=0.4)


def fits(obj: Obj, others: Sequence[Obj], margin: float) -> bool:
    """True when `obj` lies inside the image (border margin / 2) and `margin` away from every box in `others`."""
    x0, y0, x1, y1 = obj.box
    if min(x0, y0) < margin / 2 or max(x1, y1) > 1 - margin / 2:
        return False
    for o in others:
        ox0, oy0, ox1, oy1 = o.box
        if x0 < ox1 + margin and ox0 < x1 + margin and y0 < oy1 + margin and oy0 < y1 + margin:
            return False
    return True


def allowed(scene: Scene, config: WorldConfig = DEFAULT_WORLD) -> bool:
    """True when no held-out pair is an object and no held-out triple holds between two objects.

    Triples are tested with `unclear_relations`, so a training scene is never even close to one.
    """
    pairs = set(config.heldout_pairs)
    if any((o.color, o.shape) in pairs for o in scene.objects):
        return False
    triples = config.triples
    if triples:
        for i, a in enumerate(scene.objects):
            for j, b in enumerate(scene.objects):
                if i != j and any((a.shape, r, b.shape) in triples for r in unclear_relations(a, b)):
                    return False
    return True


def has_heldout(scene: Scene, config: WorldConfig = DEFAULT_WORLD) -> bool:
    """True when the scene shows a held-out pair, or a held-out triple holds clearly between two objects."""
    pairs = set(config.heldout_pairs)
    if any((o.color, o.shape) in pairs for o in scene.objects):
        return True
    triples = config.triples
    return any(
        (a.shape, r, b.shape) in triples
        for i, a in enumerate(scene.objects)
        for j, b in enumerate(scene.objects)
        if i != j
        for r in clear_relations(a, b)
    )


def random_pair(rng: np.random.Generator, config: WorldConfig = DEFAULT_WORLD, *, heldout: bool = False, shape=None):
    """A (colour, shape) pair: a held-out one when `heldout`, else one that is not held out."""
    if heldout:
        pairs = [p for p in config.heldout_pairs if shape is None or p[1] == shape]
        return pairs[rng.integers(len(pairs))]
    while True:
        pair = (list(COLORS)[rng.integers(len(COLORS))], shape or SHAPES[rng.integers(len(SHAPES))])
        if pair not in config.heldout_pairs:
            return pair


def place(
    rng: np.random.Generator,
    kinds: Sequence[tuple[str, str]],
    config: WorldConfig = DEFAULT_WORLD,
    *,
    fixed: Sequence[Obj] = (),
    tries: int = 200,
) -> list[Obj] | None:
    """Random non-overlapping placements for `kinds` [(colour, shape), ...] next to the `fixed` objects.

    Returns the new objects (in order), or None when one could not be placed in `tries` attempts.
    """
    objs: list[Obj] = []
    for color, shape in kinds:
        for _ in range(tries):
            size = float(rng.uniform(config.min_size, config.max_size))
            lo, hi = size / 2 + config.margin / 2, 1 - size / 2 - config.margin / 2
            cand = Obj(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size)
            if fits(cand, list(fixed) + objs, config.margin):
                objs.append(cand)
                break
        else:
            return None
    return objs


def sample_scene(
    rng: np.random.Generator,
    config: WorldConfig = DEFAULT_WORLD,
    *,
    num_objects: int | None = None,
    kinds: Sequence[tuple[str | None, str | None]] | None = None,
    relation: tuple[int, str, int] | None = None,
    split: str = "train",
    max_tries: int = 1000,
) -> Scene:
    """Sample a scene.

    Args:
      rng: the only source of randomness (same generator state -> same scene).
      num_objects: 1..config.max_objects (random when None and `kinds` is None).
      kinds: per object (colour, shape); a None entry is drawn at random (never a held-out pair).
      relation: (i, rel, j): object i must clearly be `rel` object j (GenEval's rule, with margin).
      split: 'train'/'validation' scenes are `allowed` (no held-out pair or triple anywhere);
        'heldout' scenes are unrestricted (the caller puts the held-out combination in).
    Returns: a Scene; raises RuntimeError when the constraints cannot be met.
    """
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; expected one of {SPLITS}")
    if kinds is None:
        n = int(rng.integers(1, config.max_objects + 1)) if num_objects is None else num_objects
        kinds = [(None, None)] * n
    if not 1 <= len(kinds) <= config.max_objects:
        raise ValueError(f"num_objects: {len(kinds)} not in [1, {config.max_objects}]")
    if relation is not None:
        check_relation(relation[1], "relation")
    for _ in range(max_tries):
        resolved = []
        for color, shape in kinds:
            if color is None or shape is None:
                c, s = random_pair(rng, config, shape=shape)
                color = color or c
                if (color, s) in config.heldout_pairs and shape is None:  # a fixed colour: redraw the shape
                    s = next(str(x) for x in rng.permutation(SHAPES) if (color, x) not in config.heldout_pairs)
                shape = shape or s
            resolved.append((color, shape))
        objs = place(rng, resolved, config)
        if objs is None:
            continue
        if relation is not None:
            i, rel, j = relation
            if rel not in clear_relations(objs[i], objs[j]):
                continue
        scene = Scene(tuple(objs))
        if split != "heldout" and not allowed(scene, config):
            continue
        return scene
    raise RuntimeError(f"could not sample a scene for kinds={kinds} relation={relation} split={split}")
