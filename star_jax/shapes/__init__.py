"""The shapes world: coloured shapes on a plain background, with exact text and an exact scorer.

- `scene`: vocabulary (COLORS, SHAPES, RELATIONS), `Scene`/`Obj`, `WorldConfig` (held-out pairs and
  triples), `sample_scene`, GenEval's `relative_position`.
- `render`: `render(scene, resolution) -> [R, R, 3] uint8`.
- `captions`: GenEval prompts + metadata, free-form captions, questions, edits.
- `shapeeval`: `evaluate_image(image, metadata) -> (correct, reason)`, `detect`, GenEval's table.
- `splits`: `make_example(split, index, kind)` for 'pair', 'qa' and 'edit'.
"""

from star_jax.shapes.captions import describe, edit, geneval_example, question, scene_metadata
from star_jax.shapes.render import render
from star_jax.shapes.scene import (
    BACKGROUND,
    COLORS,
    DEFAULT_WORLD,
    RELATIONS,
    SHAPES,
    SPLITS,
    Obj,
    Scene,
    WorldConfig,
    relative_position,
    sample_scene,
)
from star_jax.shapes.shapeeval import GENEVAL_TAGS, Detection, detect, evaluate_image, format_table, summarize
from star_jax.shapes.splits import KINDS, make_example

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DEFAULT_WORLD",
    "GENEVAL_TAGS",
    "KINDS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "Detection",
    "Obj",
    "Scene",
    "WorldConfig",
    "describe",
    "detect",
    "edit",
    "evaluate_image",
    "format_table",
    "geneval_example",
    "make_example",
    "question",
    "relative_position",
    "render",
    "sample_scene",
    "scene_metadata",
    "summarize",
]
