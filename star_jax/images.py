"""Image conversions, one of each: float [-1, 1] <-> uint8, a square resize, and the one
loader of image files and encoded bytes (`load_image`, refusing with `ImageError`).

Models see images as float32 in [-1, 1] (`to_unit_range`); files, metrics and the scorer see
uint8 RGB (`to_uint8`, round half up so that a float image written as uint8 and read back is
unchanged). Every module that converts between the two goes through here.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def to_uint8(images) -> np.ndarray:
    """Float images [..., H, W, 3] in [-1, 1] (numpy or jax, any float dtype) -> uint8 [..., H, W, 3]:
    x * 127.5 + 127.5 rounded half up, clipped to [0, 255]."""
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def to_unit_range(images) -> np.ndarray:
    """uint8 images [..., H, W, 3] -> float32 [..., H, W, 3] in [-1, 1] (x * 2 / 255 - 1)."""
    return np.asarray(images).astype(np.float32) * (2 / 255) - 1


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize_square(image: np.ndarray, size: int, *, crop: bool = False, resample: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] with PIL's `resample` ("bicubic" or "bilinear", the
    VQ input's, as the reference's). With `crop`, the centre square is cut out first (aspect kept);
    without, a non-square image is stretched (what the reference does to an edit's source). Returned
    as is when already [size, size]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image of shape {image.shape}: expected [H, W, 3] RGB")
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}: not one of {sorted(RESAMPLE)}")
    h, w = image.shape[:2]
    if crop and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[top : top + s, left : left + s]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), RESAMPLE[resample]))
    return image


# ------------------------------------------------------------------------------------------------
# Loading: one reader of image files and encoded bytes for every command and the data converter

WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag
# Why an image was refused (`ImageError.reason`): the file cannot be read, is no image, does not
# decode, has pixels with no defined 8-bit meaning, or breaks a size limit.
ERROR_REASONS = ("unreadable", "not_image", "corrupt", "mode", "too_small", "too_large", "aspect")


class ImageError(ValueError):
    """An image that cannot be used: a one-line message naming the input and the limit it breaks;
    `reason` is one of ERROR_REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown image error reason {reason!r}; known: {ERROR_REASONS}")
        super().__init__(" ".join(message.split()))  # one line
        self.reason = reason


def check_size(
    height: int,
    width: int,
    *,
    name: str,
    min_size: int | None = None,
    max_size: int | None = None,
    max_aspect: float | None = None,
) -> None:
    """Raises ImageError naming `name` and the limit when the shorter side is below `min_size`, the
    longer side above `max_size` or long / short above `max_aspect` (None: no limit)."""
    short, long = min(height, width), max(height, width)
    dims = f"{width}x{height} pixels (width x height)"
    if min_size is not None and short < min_size:
        raise ImageError("too_small", f"{name}: {dims} is smaller than the minimum side of {min_size} pixels")
    if max_size is not None and long > max_size:
        raise ImageError("too_large", f"{name}: {dims} is larger than the maximum side of {max_size} pixels")
    if max_aspect is not None and long > max_aspect * short:
        raise ImageError(
            "aspect", f"{name}: {dims} has aspect ratio {long / max(short, 1):.1f}, above the maximum of {max_aspect}"
        )


def load_image(
    source,
    *,
    name: str,
    min_size: int | None = None,
    max_size: int | None = None,
    max_aspect: float | None = None,
    background: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """An image file (path) or encoded image (bytes) -> uint8 [H, W, 3] RGB; raises ImageError (one
    line naming `name` and the limit) when it cannot be read, is not an image or breaks a limit.

    - EXIF orientation is applied (`PIL.ImageOps.exif_transpose`); the limits hold for either
      orientation: `min_size` bounds the shorter side, `max_size` the longer, `max_aspect`
      long / short. Sizes are checked from the header, before the pixels are decoded. Images over
      PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) are refused too.
    - 16-bit images (PIL modes I;16*, I, and 16-bit RGB / RGBA PNGs, read at full precision) are
      scaled by their true bit depth to 8 bits, round(x * 255 / (2**bits - 1)) (x / 257 for 16
      bits), never clipped. 32-bit float images have no defined range and are refused.
    - Alpha (RGBA, LA, PA, P / L / RGB with a transparent colour) is composited onto `background`,
      as `PIL.Image.paste` with the alpha as mask does; the default is white, as the Qwen2.5-VL
      processor (`qwen_vl_utils.to_rgb`) does. A model trained on the shapes world, whose scenes
      lie on `star_jax.shapes.BACKGROUND` (mid grey), reads transparent images best over that.
    - Palette, 1-bit, grey, YCbCr, HSV and CMYK images are converted to RGB (CMYK through its
      embedded ICC profile when it has one). The colours of RGB images are kept as stored (no ICC
      conversion), so a plain 8-bit RGB PNG or JPEG decodes exactly as `np.asarray(Image.open(f))`.
    """
    data = _read(source, name)
    pil = _open(data, name)
    check_size(pil.height, pil.width, name=name, min_size=min_size, max_size=max_size, max_aspect=max_aspect)
    rawmode16 = _png16_rawmode(pil)
    _load(pil, name)
    oriented = _orient(pil)
    if rawmode16:
        exact = _png16_exact(data, pil, rawmode16)
        if exact is not None:
            return _finish(*_from_values(exact, 16, pil.info.get("transparency"), name), background)
    return _finish(*_pixels(oriented, name), background)


def is_plain_rgb(data: bytes) -> bool:
    """True when `load_image` of these bytes is their plain decoding: an 8-bit RGB PNG or JPEG with
    no transparency and no EXIF rotation (the data converter stores such bytes unchanged)."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            plain = pil.format in ("PNG", "JPEG") and pil.mode == "RGB" and "transparency" not in pil.info
            return plain and not _png16_rawmode(pil) and pil.getexif().get(_ORIENTATION, 1) == 1
    except Exception:
        return False


def _read(source, name: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"{name}: expected a path or bytes, got {type(source).__name__}")
    if not os.path.exists(source):
        raise ImageError("unreadable", f"{name}: does not exist")
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError("unreadable", f"{name}: cannot be read ({e.strerror or type(e).__name__})") from None


def _open(data: bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError("too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not_image", f"{name}: not an image ({len(data)} bytes starting {data[:8]!r}, in no format PIL reads)"
        ) from None
    except Exception as e:  # PIL raises many types for bad headers
        raise ImageError("corrupt", f"{name}: the image header does not parse ({type(e).__name__}: {e})") from None


def _load(pil: Image.Image, name: str) -> None:
    try:
        pil.load()
    except Exception as e:  # truncated or corrupt pixel data
        raise ImageError(
            "corrupt", f"{name}: {pil.format} image data does not decode ({type(e).__name__}: {e})"
        ) from None


def _orient(pil: Image.Image) -> Image.Image:
    """`pil` turned upright by its EXIF orientation (itself when there is none)."""
    return ImageOps.exif_transpose(pil) if pil.getexif().get(_ORIENTATION, 1) != 1 else pil


def _png16_rawmode(pil: Image.Image) -> str | None:
    """The raw mode of a 16-bit RGB / RGBA PNG, which PIL decodes to 8 bits by keeping the high byte."""
    if pil.format != "PNG" or len(pil.tile) != 1:
        return None
    rawmode = pil.tile[0].args
    return rawmode if rawmode in ("RGB;16B", "RGBA;16B") else None


def _png16_exact(data: bytes, high: Image.Image, rawmode: str) -> np.ndarray | None:
    """The 16-bit values [H, W, C] of a 16-bit RGB(A) PNG, upright: PIL's decoding of the high bytes
    (`high`, loaded) plus a second decoding that reads the low byte of each sample ("…;16L" on
    big-endian data), combined in numpy. None when this PIL cannot do the second decoding."""
    try:
        low = Image.open(io.BytesIO(data))
        tile = low.tile[0]
        low.tile = [tile._replace(args=rawmode.replace(";16B", ";16L"))]
        low.load()
        low = _orient(low)
    except Exception:  # an older or newer PIL: fall back to the high byte (at most 1 off)
        return None
    return np.asarray(_orient(high)).astype(np.int64) * 256 + np.asarray(low)


def _scale(values: np.ndarray, bits: int) -> np.ndarray:
    """Integer samples in [0, 2**bits) -> uint8, round(x * 255 / (2**bits - 1)) half up (exact)."""
    top = (1 << bits) - 1
    return ((values.astype(np.int64) * 510 + top) // (2 * top)).astype(np.uint8)


def _from_values(values: np.ndarray, bits: int, transparency, name: str):
    """Grey [H, W] or RGB(A) [H, W, 3|4] integer samples of `bits` bits -> (uint8 RGB, uint8 alpha | None)."""
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ImageError(
            "mode",
            f"{name}: samples in [{values.min()}, {values.max()}] exceed the {bits}-bit range [0, {(1 << bits) - 1}]",
        )
    grey = values.ndim == 2
    colour = values[..., None].repeat(3, -1) if grey else values[..., :3]
    alpha = None if grey or values.shape[-1] == 3 else _scale(values[..., 3], bits)
    if isinstance(transparency, int | tuple) and alpha is None:  # tRNS: one fully transparent colour
        key = np.asarray(transparency).reshape(-1)[: 1 if grey else 3]
        alpha = np.where((colour == key).all(-1), 0, 255).astype(np.uint8)
    return _scale(colour, bits), alpha


def _bit_depth(pil: Image.Image) -> int:
    """Bits per sample of an integer grey image (mode I;16* or I)."""
    if pil.mode.startswith("I;16"):
        return 16
    tags = getattr(pil, "tag_v2", None)  # TIFF: BitsPerSample
    bits = tags.get(258) if tags is not None else None
    return int(bits[0] if isinstance(bits, tuple) else bits) if bits else 16


def _pixels(pil: Image.Image, name: str):
    """A loaded, upright PIL image -> (uint8 RGB [H, W, 3], uint8 alpha [H, W] | None)."""
    mode, transparency = pil.mode, pil.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return np.asarray(pil), None
    if mode.startswith("I;16") or mode == "I":
        return _from_values(np.asarray(pil), _bit_depth(pil), transparency, name)
    if mode == "F":
        raise ImageError("mode", f"{name}: a 32-bit float image has no defined range; save it with 8 or 16 bits")
    try:
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or transparency is not None:
            rgba = np.asarray(pil.convert("RGBA"))
            return rgba[..., :3], rgba[..., 3]
        if mode == "CMYK" and pil.info.get("icc_profile"):
            try:
                return np.asarray(_cmyk_to_srgb(pil)), None
            except Exception:  # a broken profile: PIL's plain formula below
                pass
        return np.asarray(pil.convert("RGB")), None
    except ValueError as e:  # a mode PIL cannot convert
        raise ImageError("mode", f"{name}: PIL mode {mode!r} cannot be converted to RGB ({e})") from None


def _cmyk_to_srgb(pil: Image.Image) -> Image.Image:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(pil.info["icc_profile"]))
    return ImageCms.profileToProfile(pil, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")


def _finish(rgb: np.ndarray, alpha: np.ndarray | None, background) -> np.ndarray:
    """RGB composited onto `background` where `alpha` < 255 (PIL's paste blend); uint8 [H, W, 3]."""
    if alpha is None or alpha.min() == 255:
        return np.ascontiguousarray(rgb, np.uint8)
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0]), tuple(int(c) for c in background))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, np.uint8)), mask=Image.fromarray(alpha, "L"))
    return np.asarray(canvas)
