"""Image conversions: uint8 -> [-1, 1] -> uint8 is the identity, rounding is half up, resizing."""

import numpy as np
import pytest

from star_jax import images


def test_uint8_round_trip_and_rounding():
    every = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, -1)
    unit = images.to_unit_range(every)
    assert unit.dtype == np.float32 and unit.min() == -1.0 and unit.max() == 1.0
    np.testing.assert_array_equal(images.to_uint8(unit), every)
    # 0 -> 127.5 rounds half up; the nearest integer otherwise; out-of-range values clip.
    x = np.array([0.0, -0.3 / 127.5, 1.3 / 127.5, -3.0, 3.0])
    assert images.to_uint8(x).tolist() == [128, 127, 129, 0, 255]


def test_resize_square_stretches_or_crops():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre square is all white
    assert images.resize_square(image, 8).shape == (8, 8, 3)
    assert images.resize_square(image, 8)[:, 0].max() == 0  # stretched: the black edge stays
    np.testing.assert_array_equal(images.resize_square(image, 8, crop=True), np.full((8, 8, 3), 255, np.uint8))
    same = np.ones((8, 8, 3), np.uint8)
    assert images.resize_square(same, 8) is same
    with pytest.raises(ValueError, match="expected"):
        images.resize_square(np.zeros((8, 8), np.uint8), 4)
