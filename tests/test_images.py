"""Image conversions (uint8 -> [-1, 1] -> uint8 is the identity, rounding is half up, resizing) and
the one image loader: 16-bit, alpha, palette, grey, CMYK, EXIF orientation, limits, refusals."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

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


# ------------------------------------------------------------------------------------------------
# load_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit grey [H, W] / RGB [H, W, 3] / RGBA [H, W, 4] PNG, written by hand (PIL writes no
    16-bit colour PNGs)."""
    h, w = values.shape[:2]
    colour_type = {2: 0, 3: 2, 4: 6}[values.ndim if values.ndim == 2 else values.shape[2]]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
GREY = (128, 128, 128)


def test_plain_rgb_png_round_trips_bit_exactly(tmp_path):
    data = encode(Image.fromarray(RGB))
    out = images.load_image(data, name="image")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, RGB)
    (tmp_path / "a.png").write_bytes(data)
    np.testing.assert_array_equal(images.load_image(tmp_path / "a.png", name="a.png"), RGB)
    np.testing.assert_array_equal(images.load_image(str(tmp_path / "a.png"), name="a.png", min_size=24), RGB)
    assert images.is_plain_rgb(data) and images.is_plain_rgb(encode(Image.fromarray(RGB), "JPEG"))


def test_16_bit_grey_is_scaled_by_its_depth_not_clipped():
    values = np.array([[0, 257, 32768, 65535], [1000, 30000, 65280, 128]], np.uint16).repeat(4, 0).repeat(4, 1)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = images.load_image(data, name="depth.png")
    want = np.floor(values / 257 + 0.5).astype(np.uint8)  # 32768 -> 127.5 -> 128, not 255
    np.testing.assert_array_equal(out, want[..., None].repeat(3, -1))
    assert out[0, 8].tolist() == [128, 128, 128] and (out == 255).mean() < 0.2


def test_16_bit_rgb_and_rgba_pngs_are_read_at_full_precision():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (16, 20, 3)).astype(np.uint16)
    rgb[0, 0] = (1000, 65535, 127)  # the high byte alone would give 3, not round(1000 / 257) = 4
    out = images.load_image(png16(rgb), name="rgb16.png")
    np.testing.assert_array_equal(out, np.floor(rgb / 257 + 0.5).astype(np.uint8))
    assert out[0, 0].tolist() == [4, 255, 0]
    rgba = np.concatenate([rgb, np.full((16, 20, 1), 65535, np.uint16)], -1)
    rgba[:4, :, 3] = 0  # transparent rows -> the background
    out = images.load_image(png16(rgba), name="rgba16.png", background=GREY)
    np.testing.assert_array_equal(out[:4], np.full((4, 20, 3), 128, np.uint8))
    np.testing.assert_array_equal(out[4:], np.floor(rgb[4:] / 257 + 0.5).astype(np.uint8))
    assert not images.is_plain_rgb(png16(rgb))


def test_rgba_alpha_is_composited_onto_the_background():
    rgba = np.concatenate([RGB, np.full((24, 32, 1), 255, np.uint8)], -1)
    rgba[:, :16, 3] = 0  # left half fully transparent
    rgba[:, 16:24, 3] = 128  # half transparent
    data = encode(Image.fromarray(rgba, "RGBA"))
    white = images.load_image(data, name="logo.png")
    np.testing.assert_array_equal(white[:, :16], np.full((24, 16, 3), 255, np.uint8))  # not black
    np.testing.assert_array_equal(white[:, 24:], RGB[:, 24:])
    half = (RGB[:, 16:24].astype(int) + 255) / 2
    assert np.abs(white[:, 16:24] - half).max() <= 1
    grey = images.load_image(data, name="logo.png", background=GREY)
    np.testing.assert_array_equal(grey[:, :16], np.full((24, 16, 3), 128, np.uint8))
    assert not images.is_plain_rgb(data)


def test_la_and_palette_with_transparency():
    la = np.zeros((20, 20, 2), np.uint8)
    la[..., 0], la[:10, :, 1], la[10:, :, 1] = 200, 0, 255
    out = images.load_image(encode(Image.fromarray(la, "LA")), name="la.png", background=(0, 0, 255))
    assert out[0, 0].tolist() == [0, 0, 255] and out[15, 0].tolist() == [200, 200, 200]

    pal = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20) % 3, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = encode(pal, transparency=1)  # index 1 (green) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = images.load_image(data, name="pal.png", background=GREY)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [128, 128, 128]
    assert out[0, 2].tolist() == [0, 0, 255]
    opaque = images.load_image(encode(pal), name="pal.png")  # no transparency: the palette's colours
    assert opaque[0, 1].tolist() == [0, 255, 0]


def test_grey_and_cmyk_jpeg_are_converted():
    grey = np.random.default_rng(2).integers(0, 256, (20, 24), dtype=np.uint8)
    np.testing.assert_array_equal(
        images.load_image(encode(Image.fromarray(grey)), name="g"), grey[..., None].repeat(3, -1)
    )
    cmyk = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = images.load_image(data, name="cmyk.jpg")
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - [0, 255, 255]).max() <= 8


def test_exif_orientation_is_applied():
    image = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
    image[:, :20] = (255, 0, 0)  # left half red, right half blue
    image[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(image), "JPEG", quality=95, exif=exif.tobytes())
    out = images.load_image(data, name="phone.jpg")
    assert out.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50  # the stored left (red) is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50
    assert not images.is_plain_rgb(data)


@pytest.mark.parametrize(
    "data, limits, reason, words",
    [
        (encode(Image.fromarray(RGB[:8, :8])), {"min_size": 16}, "too_small", "minimum side of 16 pixels"),
        (encode(Image.fromarray(RGB)), {"max_size": 30}, "too_large", "maximum side of 30 pixels"),
        (encode(Image.fromarray(np.zeros((16, 96, 3), np.uint8))), {"max_aspect": 4.0}, "aspect", "maximum of 4.0"),
        (b"not an image at all", {}, "not_image", "not an image"),
        (b"", {}, "not_image", "not an image"),
        (encode(Image.fromarray(RGB))[:80], {}, "corrupt", "does not decode"),
        (encode(Image.new("F", (20, 20), 0.5), "TIFF"), {}, "mode", "32-bit float"),
    ],
)
def test_refusals_are_one_line_naming_input_and_limit(data, limits, reason, words):
    with pytest.raises(images.ImageError) as e:
        images.load_image(data, name="in/put.png", **limits)
    assert e.value.reason == reason and isinstance(e.value, ValueError)
    message = str(e.value)
    assert "\n" not in message and message.startswith("in/put.png: ") and words in message


def test_unreadable_path_and_sizes_checked_in_either_orientation(tmp_path):
    with pytest.raises(images.ImageError, match=r"^.*missing\.png: does not exist$") as e:
        images.load_image(tmp_path / "missing.png", name=str(tmp_path / "missing.png"))
    assert e.value.reason == "unreadable"
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(images.ImageError, match="notes.png: not an image"):
        images.load_image(tmp_path / "notes.png", name="notes.png")
    tall = encode(Image.fromarray(np.zeros((40, 20, 3), np.uint8)))
    assert images.load_image(tall, name="t", min_size=20, max_size=40, max_aspect=2.0).shape == (40, 20, 3)
    with pytest.raises(images.ImageError, match="20x40 pixels"):
        images.load_image(tall, name="t", max_aspect=1.5)


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    for side in (20, 30):  # over the limit (PIL warns), and over twice the limit (PIL raises)
        with pytest.raises(images.ImageError, match="bomb.png: .*exceeds limit of") as e:
            images.load_image(encode(Image.new("RGB", (side, side))), name="bomb.png")
        assert e.value.reason == "too_large"


def test_resize_square_bilinear_is_pils_bilinear():
    image = np.random.RandomState(0).randint(0, 256, (30, 50, 3), np.uint8)
    want = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(images.resize_square(image, 16, resample="bilinear"), want)
    assert not np.array_equal(images.resize_square(image, 16), want)  # bicubic differs
    with pytest.raises(ValueError, match="resample='nearest'"):
        images.resize_square(image, 16, resample="nearest")
