"""The shapes project's data: the understanding stream's mixture (a data source) and the vision
stage's labels (an example builder). Name this module in `config.imports` to register the source.

Source "shapes_mix" (`config.data.source`): the core shapes world (`input.sources.ShapesSource`),
whose question-answer records (a stage that reads "qa") mix in, by these `config.data` keys:
  caption_fraction    that fraction of records asks for the scene's free-form caption instead of
                      one question (`CAPTION_QUESTION`; a dense signal: every object's colour,
                      shape and count); float in [0, 1], default 0
  qa_per_image        questions per image, as the turns of one chat: each record also carries
                      `follow_ups`, qa_per_image - 1 more distinct questions about the same scene
                      (JSON `[[question, answer], ...]`); int >= 1, default 1
  grounding_fraction  that fraction of the QA turns (first and follow-ups; not captions) instead ask
                      where an object is (`captions.grounding_question`: "where in the image is the
                      red circle?" -> "(3, 7)"); float in [0, 1], default 0
Every draw is a pure function of (seed, split, index); with every key at its default the stream is
the core "shapes" source's. Pairs and edits records are the core source's.

Vision-stage labels (`vision_example`, the builder of projects/shapes/vision.py's stage), by
`config.data.vision_labels`:
  caption_words  caption_words [V] float32: 1 where vocabulary word v is a token of the caption
                 (V = model.decoder.vocab_size; any image-caption data)
  scene_cells    cell_shape, cell_color [G * G] int32 (`scene_cell_targets`: the object centred in
                 each merged ViT token's cell; the shapes world's pairs, which carry `objects`)
  scene_cover    as scene_cells, and every cell an object paints >= COVER_FRACTION of names it too
and with scene labels and `config.data.scene_centres` also cell_centre [G * G, 2] float32. Always
pixels [P, patch_dim] float32 (G = merged ViT tokens per side, P = patches per image).
"""

from __future__ import annotations

import numpy as np

from star_jax import records, sequences
from star_jax.input import sources
from star_jax.shapes import captions
from star_jax.shapes import scene as scene_lib
from star_jax.shapes.render import shape_mask

SOURCE = "shapes_mix"
# The captioning turn's question: its answer is the scene's free-form caption.
CAPTION_QUESTION = "describe this image."
VISION_LABELS = ("caption_words", "scene_cells", "scene_cover")
SCENE_SOURCES = ("shapes", SOURCE)  # sources whose pairs carry the scene (`objects`)
COVER_FRACTION = 0.1  # scene_cover: least fraction of a cell an object must paint to label it
_COVER_SAMPLES = 8  # scene_cover: sample points per cell side


# ------------------------------------------------------------------------------------------------
# The understanding mixture


class MixSource:
    """The shapes world with the understanding mixture (module docstring): [i] -> the record of
    `kind` (pairs | qa | edits) with uint8 [R, R, 3] images and str text."""

    def __init__(
        self,
        split: str,
        kind: str,
        num_examples: int,
        *,
        resolution: int,
        seed: int = 0,
        caption_fraction: float = 0.0,
        qa_per_image: int = 1,
        grounding_fraction: float = 0.0,
    ):
        self.world = sources.ShapesSource(split, kind, num_examples, resolution=resolution, seed=seed)
        self.split, self.kind, self.seed = split, kind, seed
        self.caption_fraction, self.qa_per_image = caption_fraction, qa_per_image
        self.grounding_fraction = grounding_fraction

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        if self.kind != "qa":
            return self.world[index]
        if self.caption_fraction and self._is_caption(index):
            ex = self.world.example(index, "pair", tag="free_form")
            ex |= {"question": CAPTION_QUESTION, "answer": ex["caption"]}
        else:
            ex = self.world.example(index, "qa")
        grounding = self._grounding_rng(index)
        if grounding is not None and ex["question"] != CAPTION_QUESTION:
            q, a = self._maybe_grounding(grounding, ex, ex["question"], ex["answer"])
            ex = ex | {"question": q, "answer": a}
        record = {"image": ex["image"], "question": ex["question"], "answer": ex["answer"]}
        if self.qa_per_image > 1:
            record["follow_ups"] = records.json_dumps(self._follow_ups(index, ex, grounding))
        return record

    def _rng(self, index: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, scene_lib.SPLITS.index(self.split), int(index), salt])

    def _is_caption(self, index: int) -> bool:
        return bool(self._rng(index, 0xCA9).random() < self.caption_fraction)

    def _follow_ups(self, index: int, ex: dict, grounding: np.random.Generator | None) -> list[list[str]]:
        """`qa_per_image - 1` more questions about the example's scene (after its QA or captioning
        turn), none asked twice: [[q, a], ...]. With `grounding` (the record's grounding RNG), each
        may become a grounding question."""
        rng = self._rng(index, 0xF0)
        asked, out = {ex["question"]}, []
        for _ in range(20 * self.qa_per_image):  # a scene with one object admits few distinct questions
            if len(out) == self.qa_per_image - 1:
                break
            q, a, _ = captions.question(rng, ex["scene"], split=self.split)
            if grounding is not None:
                q, a = self._maybe_grounding(grounding, ex, q, a)
            if q not in asked:
                asked.add(q)
                out.append([q, a])
        return out

    def _grounding_rng(self, index: int) -> np.random.Generator | None:
        """The record's RNG of grounding draws; None when `grounding_fraction` is 0, so that every
        other draw of the stream stays as it was."""
        return self._rng(index, 0x6D) if self.grounding_fraction else None

    def _maybe_grounding(self, rng: np.random.Generator, ex: dict, q: str, a: str) -> tuple[str, str]:
        """(q, a), or with probability `grounding_fraction` a grounding question about the scene."""
        if rng.random() >= self.grounding_fraction:
            return q, a
        grounded = captions.grounding_question(rng, ex["scene"], split=self.split)
        return (q, a) if grounded is None else grounded[:2]


def mixture(data) -> dict:
    """{caption_fraction, qa_per_image, grounding_fraction} of `config.data` (defaults 0.0, 1, 0.0);
    a ValueError naming the key and its value when one is out of range."""
    out = {
        "caption_fraction": data.get("caption_fraction", 0.0),
        "qa_per_image": data.get("qa_per_image", 1),
        "grounding_fraction": data.get("grounding_fraction", 0.0),
    }
    for name in ("caption_fraction", "grounding_fraction"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"config.data.{name}={value!r}: must be in [0, 1]")
    per_image = out["qa_per_image"]
    if not isinstance(per_image, int) or isinstance(per_image, bool) or per_image < 1:
        raise ValueError(f"config.data.qa_per_image={per_image!r}: must be an integer >= 1")
    return out


def mix_source(config, split: str, stage, render_size: int):
    """The "shapes_mix" source factory (`input.sources.register_source`): (MixSource, None)."""
    if config.data.pretokenized:
        raise ValueError(f"config.data.pretokenized=True needs source='arrayrecord', not {SOURCE!r}")
    n = sources.split_size(config, split)
    source = MixSource(split, stage.reads, n, resolution=render_size, seed=config.seed, **mixture(config.data))
    return source, None


sources.register_source(SOURCE, mix_source)


# ------------------------------------------------------------------------------------------------
# The vision stage's labels


def check_vision_labels(config) -> None:
    """Raises ValueError naming the key and value when `config.data.vision_labels` is not one of
    VISION_LABELS, asks for scene labels from a source without scenes, or `config.data.scene_centres`
    is set without scene labels."""
    data = config.data
    labels = data.get("vision_labels", "caption_words")
    if labels not in VISION_LABELS:
        raise ValueError(f"config.data.vision_labels={labels!r}: not one of {VISION_LABELS}")
    if labels != "caption_words" and data.source not in SCENE_SOURCES:
        raise ValueError(
            f"config.data.vision_labels={labels!r}: scene cells come from the shapes world "
            f"(source in {SCENE_SOURCES}), not source={data.source!r}"
        )
    if data.get("scene_centres", False) and labels == "caption_words":
        raise ValueError(
            "config.data.scene_centres=True: needs scene labels (vision_labels 'scene_cells' or 'scene_cover')"
        )


def vision_example(prepare, record: dict) -> dict:
    """A pairs record -> the vision stage's example (module docstring): pixels [P, patch_dim] float32
    and the labels of `config.data.vision_labels` (read from `prepare.spec.data`)."""
    s = prepare.spec
    labels = s.data.get("vision_labels", "caption_words")
    out = {"pixels": prepare.pixels(prepare.image(record, "image"))}
    if labels == "caption_words":
        out["caption_words"] = sequences.bag_of_words(prepare.tokenizer, prepare.text(record, "caption"), s.vocab_size)
        return out
    if labels not in VISION_LABELS:
        raise ValueError(f"config.data.vision_labels={labels!r}: not one of {VISION_LABELS}")
    objects = records.decode_objects(records.field(record, "objects"))
    targets = scene_cell_targets(objects, s.merged_grid, cover=labels == "scene_cover")
    if not s.data.get("scene_centres", False):
        del targets["cell_centre"]
    return out | targets


def scene_cell_objects(objects, grid: int, *, cover: bool = False) -> np.ndarray:
    """Which object labels each merged ViT token in the vision stage's scene labels.

    objects: [[shape, colour, x, y, size], ...] (a shapes-world scene; centres as fractions of the
    image side); grid: merged tokens per side (G). Returns [G * G] int32 in the merged tokens'
    raster order: the index in `objects` of the object whose centre lies in the cell, -1 where none
    does. Two centres in one cell (rare: boxes keep a margin) give it the larger object.
    cover=True (vision_labels='scene_cover') also gives every other cell to the object that paints
    most of it, when that is at least COVER_FRACTION (8 x 8 sample points per cell), so every token
    an object covers names its shape, as every covered token shows its colour.
    """
    owner = np.full(grid * grid, -1, np.int32)
    size_of = np.zeros(grid * grid)
    coverage = np.zeros((len(objects), grid * grid))
    points = (np.arange(grid * _COVER_SAMPLES) + 0.5) / (grid * _COVER_SAMPLES)
    for k, (shape, color, x, y, size) in enumerate(objects):
        scene_lib.check_shape(shape, "objects")
        scene_lib.check_color(color, "objects")
        row, col = (min(max(int(v * grid), 0), grid - 1) for v in (y, x))
        cell = row * grid + col
        if size > size_of[cell]:
            owner[cell], size_of[cell] = k, size
        if cover:
            half = size / 2
            inside = shape_mask(shape, (points[None, :] - x) / half, (points[:, None] - y) / half)
            s = _COVER_SAMPLES
            coverage[k] = inside.reshape(grid, s, grid, s).mean(axis=(1, 3)).reshape(-1)
    if cover and len(objects):
        free = (owner < 0) & (coverage.max(0) >= COVER_FRACTION)
        owner[free] = coverage.argmax(0)[free]
    return owner


def scene_cell_targets(objects, grid: int, *, cover: bool = False) -> dict[str, np.ndarray]:
    """Dense targets of the vision stage's scene labels, one per merged ViT token, from the object
    `scene_cell_objects(objects, grid, cover=cover)` gives each cell.

    Returns cell_shape, cell_color [G * G] int32 (1 + the index in shapes.SHAPES / shapes.COLORS,
    0 where no object) and cell_centre [G * G, 2] float32 (that object's centre (x, y) in cells of
    the merged grid, 0 where none; the `data.scene_centres` targets).
    """
    owner = scene_cell_objects(objects, grid, cover=cover)  # -1 picks each table's trailing "none"
    shape_ids = np.array([1 + scene_lib.SHAPES.index(o[0]) for o in objects] + [0], np.int32)
    color_ids = np.array([1 + list(scene_lib.COLORS).index(o[1]) for o in objects] + [0], np.int32)
    centres = np.array([[o[2] * grid, o[3] * grid] for o in objects] + [[0.0, 0.0]], np.float32)
    return {"cell_shape": shape_ids[owner], "cell_color": color_ids[owner], "cell_centre": centres[owner]}
