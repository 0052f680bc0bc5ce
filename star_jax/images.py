"""Image conversions, one of each: float [-1, 1] <-> uint8, and a bicubic square resize.

Models see images as float32 in [-1, 1] (`to_unit_range`); files, metrics and the scorer see
uint8 RGB (`to_uint8`, round half up so that a float image written as uint8 and read back is
unchanged). Every module that converts between the two goes through here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """Float images [..., H, W, 3] in [-1, 1] (numpy or jax, any float dtype) -> uint8 [..., H, W, 3]:
    x * 127.5 + 127.5 rounded half up, clipped to [0, 255]."""
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def to_unit_range(images) -> np.ndarray:
    """uint8 images [..., H, W, 3] -> float32 [..., H, W, 3] in [-1, 1] (x * 2 / 255 - 1)."""
    return np.asarray(images).astype(np.float32) * (2 / 255) - 1


def resize_square(image: np.ndarray, size: int, *, crop: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic (PIL). With `crop`, the centre square is
    cut out first (aspect kept); without, a non-square image is stretched. Returned as is when
    already [size, size]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image of shape {image.shape}: expected [H, W, 3] RGB")
    h, w = image.shape[:2]
    if crop and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[top : top + s, left : left + s]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image
