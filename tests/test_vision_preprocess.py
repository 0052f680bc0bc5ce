"""Image preprocessing equals transformers' Qwen2-VL image processor (the numpy / PIL backend)."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from star_jax.configs import star as star_config
from star_jax.models import vision_preprocess

# (height, width), min_pixels, max_pixels, patch_size: square, wide, tall, downscaled, upscaled, odd.
CASES = [
    ((224, 224), 56 * 56, 28 * 28 * 1280, 14),
    ((50, 70), 56 * 56, 28 * 28 * 1280, 14),
    ((37, 300), 56 * 56, 28 * 28 * 1280, 14),
    ((500, 90), 56 * 56, 28 * 28 * 64, 14),  # max_pixels binds
    ((1000, 800), 56 * 56, 28 * 28 * 100, 14),  # large, downscaled
    ((20, 24), 112 * 112, 28 * 28 * 1280, 14),  # min_pixels binds
    ((64, 64), 32 * 32, 64 * 64, 8),  # the shapes world: patch 8, 64 px
    ((61, 99), 16 * 16, 64 * 64, 8),
]


def _image(shape, seed):
    # Smooth gradients plus noise: bicubic overshoot and clipping both occur.
    rng = np.random.RandomState(seed)
    h, w = shape
    base = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return np.clip(base + rng.randint(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_hf_processor(case):
    size, min_pixels, max_pixels, patch = CASES[case]
    image = _image(size, case)
    hf = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch)
    ref = hf(images=[image], return_tensors="np")
    pixels, grid = vision_preprocess.preprocess([image], min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pixels.shape == ref["pixel_values"].shape and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0)
    tokens = vision_preprocess.num_image_tokens(*size, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch)
    assert tokens == grid[0].prod() // 4


def test_batch_of_images_and_grey():
    images = [_image((90, 60), 1), _image((40, 130), 2), _image((56, 56), 3)[:, :, 0]]
    hf = Qwen2VLImageProcessorPil()
    ref = hf(images=[images[0], images[1], np.repeat(images[2][:, :, None], 3, 2)], return_tensors="np")
    pixels, grid = vision_preprocess.preprocess(images)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_equals_hf():
    rng = np.random.RandomState(0)
    for h, w in rng.randint(10, 3000, (200, 2)):
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 16 * 28 * 28)):
            assert vision_preprocess.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"images\[0\]: dtype float32"):
        vision_preprocess.preprocess([np.zeros((28, 28, 3), np.float32)])
    with pytest.raises(ValueError, match=r"images\[1\]: shape \(28, 28, 4\)"):
        vision_preprocess.preprocess([np.zeros((28, 28, 3), np.uint8), np.zeros((28, 28, 4), np.uint8)])
    with pytest.raises(ValueError, match="aspect ratio"):
        vision_preprocess.smart_resize(10, 3000)
    with pytest.raises(ValueError, match="images is empty"):
        vision_preprocess.preprocess([])


def test_pixel_bounds_follow_the_config_and_default_to_the_training_square():
    official = star_config.get_config("size=3b,stage=editing").data
    assert vision_preprocess.pixel_bounds(official) == (56 * 56, 28 * 28 * 1280)
    assert vision_preprocess.pixel_bounds(official, editing=True) == (56 * 56, 28 * 28 * 576)
    tiny = star_config.get_config("size=tiny,stage=editing").data
    assert vision_preprocess.pixel_bounds(tiny, editing=True) == (56 * 56, 56 * 56)
    # A 1024^2 source of an edit: 576 ViT tokens (24 x 24 merged), as the reference; non-square keeps its aspect.
    assert vision_preprocess.num_image_tokens(1024, 1024, max_pixels=28 * 28 * 576) == 576
    h, w = vision_preprocess.smart_resize(768, 1024, 28, 56 * 56, 28 * 28 * 576)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 576 and abs(w / h - 4 / 3) < 0.1


def test_an_image_below_one_merged_patch_is_refused_naming_it():
    vision_preprocess.check_min_side(28, 300, 28, name="src.png")
    with pytest.raises(ValueError, match=r"src.png: 300x20 pixels .* minimum side of 28 pixels"):
        vision_preprocess.check_min_side(20, 300, 28, name="src.png")
