"""`star-jax vq`: tokenize a folder of images into VQ codes, and decode codes back to PNGs.

  star-jax vq encode --images DIR --out codes.arrayrecord [--workdir W | --weights FILE | --size NAME]
  star-jax vq decode --codes codes.arrayrecord --out DIR [--workdir W | --weights FILE | --size NAME]
  star-jax vq ceiling --workdir W [--per_task 16] [--usage_images 1024]

`ceiling` scores a VQ on the shapes world: PSNR and ShapeEval of round trips of validation renders
(GenEval's six tasks, `--per_task` prompts each: the ceiling of any generator on this tokenizer) and
the fraction of the codebook used over `--usage_images` renders.

The VQ comes from `--workdir` (the newest checkpoint of a run's `vq` stage, or of a later stage that
holds the VQ frozen, with the config saved beside it), from `--weights` (reference names: standalone
`.safetensors` / `.pt` or a STAR checkpoint's `pixel_encoder.*`; sizes read off the shapes, or from
`--size` when both are given) or, for smoke runs, a random init of `--size`. Images are read by
`star_jax.images.load_image` (16-bit scaled, transparency composited onto white, palette / grey / CMYK
converted, EXIF orientation applied; a file that is no image stops the command with one line naming
it), resized (bicubic) to the VQ's `image_size` and scaled to [-1, 1]. Each ArrayRecord record is a msgpack map
`{"name": str, "shape": [h, w], "dtype": "<i4", "codes": bytes}` (`encode_record` / `decode_record`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags
from flax import nnx

from star_jax import images as image_lib
from star_jax import init_sources, sharding
from star_jax.cli import common
from star_jax.convert import vq_io
from star_jax.eval import shapes_world
from star_jax.models import vq

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def encode_record(name: str, codes: np.ndarray) -> bytes:
    """msgpack bytes of one image's codes [h, w] (stored int32 little-endian, row-major)."""
    import msgpack

    codes = np.ascontiguousarray(codes, dtype="<i4")
    if codes.ndim != 2:
        raise ValueError(f"codes of {name!r} must be [h, w], got shape {codes.shape}")
    return msgpack.packb({"name": name, "shape": list(codes.shape), "dtype": "<i4", "codes": codes.tobytes()})


def decode_record(blob: bytes) -> tuple[str, np.ndarray]:
    """(name, codes [h, w] int32) of one record written by `encode_record`."""
    import msgpack

    rec = msgpack.unpackb(blob)
    missing = {"name", "shape", "dtype", "codes"} - set(rec)
    if missing:
        raise ValueError(f"VQ code record lacks fields {sorted(missing)}")
    codes = np.frombuffer(rec["codes"], dtype=np.dtype(rec["dtype"])).reshape(rec["shape"])
    return rec["name"], codes.astype(np.int32)


def write_codes(path: str, items) -> int:
    """Writes (name, codes [h, w]) pairs to an ArrayRecord file; returns the record count. The file
    appears only once complete: an error part-way (an image that does not load) leaves nothing."""
    from array_record.python.array_record_module import ArrayRecordWriter

    partial = f"{path}.partial"
    writer = ArrayRecordWriter(partial, "group_size:1")
    n = 0
    try:
        for name, codes in items:
            writer.write(encode_record(name, codes))
            n += 1
    except BaseException:
        writer.close()
        os.remove(partial)
        raise
    writer.close()
    os.replace(partial, path)
    return n


def read_codes(path: str) -> list[tuple[str, np.ndarray]]:
    """All (name, codes [h, w] int32) records of an ArrayRecord file, in order."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.path.exists(path):
        raise FileNotFoundError(f"--codes {path}: no such file")
    reader = ArrayRecordReader(path)
    try:
        return [decode_record(b) for b in reader.read_all()]
    finally:
        reader.close()


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive), sorted, as paths relative to it."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: not a directory")
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not out:
        raise FileNotFoundError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(out)


def load_image(path: str, size: int) -> np.ndarray:
    """[size, size, 3] float32 in [-1, 1]: `images.load_image` (16-bit scaled, alpha over white,
    EXIF orientation applied; `images.ImageError`, one line naming the file, when it is no image),
    then a bicubic resize."""
    rgb = image_lib.load_image(path, name=path)
    return image_lib.to_unit_range(image_lib.resize_square(rgb, size))


def build_model(weights: str | None, size: str | None, seed: int = 0, **overrides):
    """The VQModel of `--weights` (config from `--size` when given, else from the tensor shapes) or
    a random init of `--size`."""
    if weights:
        cfg = vq.VQConfig.from_size(size, **overrides) if size else None
        return vq_io.load_vq(weights, cfg, **({} if size else overrides))
    if not size:
        raise ValueError("give --weights FILE (reference names) or --size NAME (random init, smoke use)")
    cfg = vq.VQConfig.from_size(size, **overrides)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        return vq.VQModel(cfg, rngs=nnx.Rngs(seed))


VQ_STAGES = ("vq", "editing", "generation")  # stages whose checkpoints hold the VQ


def _batches(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def encode_folder(model, folder: str, out: str, batch_size: int = 8) -> int:
    """Encodes every image under `folder` into `out` (ArrayRecord); names are relative paths without suffix."""
    files = list_images(folder)
    size = model.cfg.image_size
    encode = nnx.jit(lambda m, x: m.encode_to_codes(x))

    def items():
        for chunk in _batches(files, batch_size):
            x = np.stack([load_image(os.path.join(folder, f), size) for f in chunk])
            pad = batch_size - len(chunk)  # one compiled shape for every batch
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
            codes = np.asarray(encode(model, x))
            for f, c in zip(chunk, codes):
                yield os.path.splitext(f)[0], c

    return write_codes(out, items())


def decode_codes_to_folder(model, codes_path: str, out: str, batch_size: int = 8) -> int:
    """Decodes every record of `codes_path` to `out/{name}.png`; returns the number written."""
    from PIL import Image

    records = read_codes(codes_path)
    k = model.cfg.codebook_size
    decode = nnx.jit(lambda m, c: m.decode_codes(c))
    n = 0
    for chunk in _batches(records, batch_size):
        shapes = {c.shape for _, c in chunk}
        if len(shapes) != 1:
            raise ValueError(f"{codes_path}: records in one batch have different code shapes {sorted(shapes)}")
        codes = np.stack([c for _, c in chunk])
        bad = [name for name, c in chunk if c.min() < 0 or c.max() >= k]
        if bad:
            raise ValueError(f"{codes_path}: codes of {bad[:5]} are outside [0, codebook_size={k})")
        pad = batch_size - len(chunk)
        codes = np.concatenate([codes, np.zeros((pad, *codes.shape[1:]), codes.dtype)]) if pad else codes
        images = image_lib.to_uint8(decode(model, codes))
        for (name, _), img in zip(chunk, images):
            path = os.path.join(out, name + ".png")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            Image.fromarray(img).save(path)
            n += 1
    return n


def _define(fv: flags.FlagValues) -> None:
    """The flags of every `vq` subcommand: where the VQ comes from, and its overrides."""
    flags.DEFINE_string(
        "workdir", None, "a star_jax run: the VQ of its newest vq (or later stage) checkpoint", flag_values=fv
    )
    flags.DEFINE_string("weights", None, "VQ weights (.safetensors / .pt, reference names)", flag_values=fv)
    flags.DEFINE_string(
        "size",
        None,
        "size-table name (configs/sizes.py): the config, or a random init without --weights",
        flag_values=fv,
    )
    flags.DEFINE_integer("image_size", None, "override the VQ's image_size (encode resize target)", flag_values=fv)
    flags.DEFINE_integer("attn_heads", None, "attention heads (not stored in a state dict; default 8)", flag_values=fv)
    flags.DEFINE_integer(
        "norm_groups", None, "GroupNorm groups (not stored in a state dict; default 32)", flag_values=fv
    )
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "images per compiled call", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random init seed (--size without --weights)", flag_values=fv)
    flags.DEFINE_string("images", None, "encode: folder of images", flag_values=fv)
    flags.DEFINE_string("codes", None, "decode: ArrayRecord file of codes", flag_values=fv)
    flags.DEFINE_string("out", None, "encode: ArrayRecord file to write; decode: folder for PNGs", flag_values=fv)
    flags.DEFINE_integer("per_task", 16, "ceiling: prompts per GenEval task", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("usage_images", 1024, "ceiling: renders for codebook usage", lower_bound=1, flag_values=fv)


def _load_model(fv: flags.FlagValues):
    """The VQModel that the flags name: `--workdir`, `--weights` or `--size`."""
    if fv.workdir and (fv.weights or fv.size):
        raise ValueError("give one of --workdir, --weights and --size")
    if fv.workdir:
        return init_sources.load_workdir(fv.workdir, VQ_STAGES)[0].vq
    overrides = {k: fv[k].value for k in ("image_size", "attn_heads", "norm_groups") if fv[k].value}
    return build_model(fv.weights, fv.size, fv.seed, dtype=fv.dtype, **overrides)


def _run(argv: list[str], required: tuple[str, ...], action) -> int:
    """Parses the `vq` flags with `required` ones, then prints `action(model, fv)`; a bad input exits 2."""
    fv = flags.FlagValues()
    _define(fv)
    if required:
        flags.mark_flags_as_required(list(required), flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    try:
        print(action(_load_model(fv), fv))
    except (OSError, ValueError, KeyError, init_sources.WorkdirError) as e:
        return common.error(argv[0], e)
    return 0


def _encode(model, fv) -> str:
    n = encode_folder(model, fv.images, fv.out, fv.batch_size)
    g = model.cfg.grid_size
    return f"encoded {n} images to {fv.out} ({g}x{g} codes each)"


def _decode(model, fv) -> str:
    n = decode_codes_to_folder(model, fv.codes, fv.out, fv.batch_size)
    return f"decoded {n} images to {fv.out}"


def _ceiling(model, fv) -> str:
    r = shapes_world.vq_report(model, per_task=fv.per_task, usage_images=fv.usage_images)
    summary = (
        f"VQ ceiling: ShapeEval overall {r['summary']['overall']:.3f}, PSNR {r['psnr']:.2f} dB "
        f"({6 * fv.per_task} validation renders); over {fv.usage_images} renders: codebook usage "
        f"{r['codebook_usage']:.3f}, token entropy {r['token_entropy_bits']:.2f} bits, "
        f"{r['background_codes']} distinct codes for all-background cells"
    )
    return f"{r['table']}\n{summary}"


SUBCOMMANDS: common.Subcommands = {
    "encode": (lambda argv: _run(argv, ("images", "out"), _encode), "a folder of images -> an ArrayRecord of codes"),
    "decode": (lambda argv: _run(argv, ("codes", "out"), _decode), "an ArrayRecord of codes -> a folder of PNGs"),
    "ceiling": (lambda argv: _run(argv, (), _ceiling), "PSNR, ShapeEval and codebook usage of round trips"),
}


def main(argv: list[str]) -> int:
    """Entry point; argv[0] is the program name."""
    return common.dispatch(argv, SUBCOMMANDS, __doc__)
