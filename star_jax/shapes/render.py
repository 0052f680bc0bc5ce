"""Renderer of the shapes world: hard-edged shapes on a plain background, numpy only, any resolution.

A pixel belongs to an object when its centre lies inside the object's shape (no anti-aliasing), so
colours are exact palette values and a render is a pure function of (scene, resolution).
`shape_mask` is shared with the scorer (ShapeEval matches detected blobs against it).
"""

from __future__ import annotations

import numpy as np

from star_jax.shapes.scene import COLORS, SHAPES, Scene

CROSS_ARM = 1 / 3  # half-width of a cross arm, in units of the half side


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of `shape` in its local frame: u, v in [-1, 1] span the bounding box (v grows downwards).

    u, v: broadcastable float arrays. Returns a bool array of their broadcast shape.
    """
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return inside
    if shape == "triangle":  # apex at the top, base at the bottom
        return inside & (np.abs(u) <= (v + 1) / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        return inside & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    raise ValueError(f"shape: unknown shape {shape!r}; expected one of {list(SHAPES)}")


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """Draw `scene` at `resolution` x `resolution` pixels.

    Returns: [resolution, resolution, 3] uint8 RGB.
    """
    if resolution < 8:
        raise ValueError(f"resolution: {resolution} is too small (>= 8)")
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = scene.background
    centers = (np.arange(resolution) + 0.5) / resolution  # pixel centres in fractions of the side
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        # Only the pixels whose centres can fall inside the box are tested.
        c0, c1 = max(int(np.floor(x0 * resolution)), 0), min(int(np.ceil(x1 * resolution)) + 1, resolution)
        r0, r1 = max(int(np.floor(y0 * resolution)), 0), min(int(np.ceil(y1 * resolution)) + 1, resolution)
        half = obj.size / 2
        u = (centers[c0:c1][None, :] - obj.x) / half
        v = (centers[r0:r1][:, None] - obj.y) / half
        image[r0:r1, c0:c1][shape_mask(obj.shape, u, v)] = COLORS[obj.color]
    return image
