"""Image preprocessing for the Qwen2.5-VL vision tower, equal to Hugging Face's Qwen2-VL image processor.

Per image: `smart_resize` to multiples of `patch_size * merge_size` with the pixel count kept within
[min_pixels, max_pixels] (aspect ratio kept as well as possible); bicubic resize of the uint8 image
with PIL (what the HF processor does); rescale by 1/255; normalise with the OpenAI CLIP mean / std;
then patch flattening in merge-block-major order, each patch repeated over `temporal_patch_size`
frames, as [C, T, P, P] vectors. Pure numpy + PIL: no torch at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56  # the Qwen2.5-VL processor's bounds (understanding)
MAX_PIXELS = 28 * 28 * 1280
EDIT_MAX_PIXELS = 28 * 28 * 576  # the reference's bound for an edit's source image (576 ViT tokens)


def pixel_bounds(data, *, editing: bool = False) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the ViT input at inference from a config's `data` block:
    `vit_min_pixels` and `vit_max_pixels` (understanding) or `vit_edit_max_pixels` (`editing`);
    a key that is 0 or absent means `vit_image_size ** 2` (the fixed square the run trained at)."""
    square = int(data.vit_image_size) ** 2
    low = int(data.get("vit_min_pixels", 0) or 0) or square
    high = int(data.get("vit_edit_max_pixels" if editing else "vit_max_pixels", 0) or 0) or square
    return low, high


def check_min_side(height: int, width: int, factor: int, *, name: str) -> None:
    """Raises ValueError naming `name` when the image's shorter side is below one merged patch
    (`factor` = patch * merge pixels): smart_resize would have to invent most of such an image."""
    if min(height, width) < factor:
        raise ValueError(
            f"{name}: {width}x{height} pixels (width x height) is smaller than the ViT's minimum side of "
            f"{factor} pixels (patch_size * spatial_merge_size)"
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) both multiples of `factor`, with min_pixels <= h * w <= max_pixels (HF's rule)."""
    if min(height, width) <= 0:
        raise ValueError(f"image size ({height}, {width}) must be positive")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image size ({height}, {width}): aspect ratio {max(height, width) / min(height, width)} > 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(
    height: int,
    width: int,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
) -> int:
    """Number of `<|image_pad|>` tokens (merged patches) an image of (height, width) becomes."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return (h // patch_size) * (w // patch_size) // (merge_size * merge_size)


def _as_rgb(image, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images[{index}]: dtype {image.dtype}, expected uint8 [H, W, 3]")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images[{index}]: shape {image.shape}, expected [H, W, 3] (or [H, W] grey)")
    return image


def preprocess(
    images: Sequence[np.ndarray],
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values, grid_thw), as `Qwen2VLImageProcessor` returns them.

    Args:
      images: list of [H, W, 3] (or [H, W]) uint8 arrays, any sizes.
      min_pixels / max_pixels: bounds on the resized pixel count.
      patch_size, merge_size, temporal_patch_size: the vision tower's (VisionConfig fields).
      mean / std: per-channel normalisation constants (default OpenAI CLIP).
    Returns:
      pixel_values: [sum_i h_i * w_i, 3 * temporal_patch_size * patch_size**2] float32, images
        concatenated, patches in merge-block-major order (rows of merge_size x merge_size blocks).
      grid_thw: [num_images, 3] int64, (1, h_i, w_i) patch grid of each image.
    """
    factor = patch_size * merge_size
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    all_patches, grids = [], []
    for i, image in enumerate(images):
        image = _as_rgb(image, i)
        height, width = smart_resize(image.shape[0], image.shape[1], factor, min_pixels, max_pixels)
        resized = np.asarray(Image.fromarray(image).resize((width, height), resample=Image.BICUBIC))
        # HF: rescale in float64 then cast to float32; normalise in float32.
        pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = ((pixels - mean32) / std32).transpose(2, 0, 1)  # [C, H, W]
        gh, gw = height // patch_size, width // patch_size
        patches = pixels.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        patches = np.broadcast_to(
            patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:])
        )
        all_patches.append(patches.reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size))
        grids.append((1, gh, gw))
    if not all_patches:
        raise ValueError("preprocess: images is empty")
    return np.concatenate(all_patches, axis=0), np.asarray(grids, np.int64)
