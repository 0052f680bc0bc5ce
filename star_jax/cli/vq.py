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
`--size` when both are given) or, for smoke runs, a random init of `--size`. Images are converted to RGB, resized (bicubic) to
the VQ's `image_size` and scaled to [-1, 1]. Each ArrayRecord record is a msgpack map
`{"name": str, "shape": [h, w], "dtype": "<i4", "codes": bytes}` (`encode_record` / `decode_record`).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

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
    """Writes (name, codes [h, w]) pairs to an ArrayRecord file; returns the record count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    n = 0
    try:
        for name, codes in items:
            writer.write(encode_record(name, codes))
            n += 1
    finally:
        writer.close()
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
    """[size, size, 3] float32 in [-1, 1] (RGB, bicubic resize)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] float in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def build_model(weights: str | None, size: str | None, seed: int = 0, **overrides):
    """The VQModel of `--weights` (config from `--size` when given, else from the tensor shapes) or
    a random init of `--size`."""
    from flax import nnx

    from star_jax import sharding
    from star_jax.convert import safetensors_io
    from star_jax.models import vq

    if weights:
        cfg = vq.VQConfig.from_size(size, **overrides) if size else None
        return safetensors_io.load_vq(weights, cfg, **({} if size else overrides))
    if not size:
        raise ValueError("give --weights FILE (reference names) or --size NAME (random init, smoke use)")
    cfg = vq.VQConfig.from_size(size, **overrides)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        return vq.VQModel(cfg, rngs=nnx.Rngs(seed))


VQ_STAGES = ("vq", "editing", "generation")  # stages whose checkpoints hold the VQ


def model_from_workdir(workdir: str):
    """The trained VQModel of a star_jax run: the first of VQ_STAGES under `workdir` with a checkpoint."""
    from flax import nnx

    from star_jax import sharding, tasks
    from star_jax.decode.runner import first_trained_stage
    from star_jax.models import vq

    class VQOnly(nnx.Module):  # the `vq/...` param paths of a STAR checkpoint
        def __init__(self, cfg):
            self.vq = vq.VQModel(cfg, rngs=nnx.Rngs(0))

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir}: not a directory")
    found = first_trained_stage(workdir, VQ_STAGES)
    if found is None:
        raise FileNotFoundError(f"--workdir {workdir}: no checkpoint of any of the stages {VQ_STAGES}")
    stage, config = found
    mesh = sharding.single_device_mesh()
    model = sharding.create_sharded(
        lambda: VQOnly(vq.VQConfig.from_dict(config.model.vq)), mesh, sharding.DEFAULT_RULES
    )
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        tasks.load_from_stage(model, workdir, stage)
    return model.vq


def _batches(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def encode_folder(model, folder: str, out: str, batch_size: int = 8) -> int:
    """Encodes every image under `folder` into `out` (ArrayRecord); names are relative paths without suffix."""
    from flax import nnx

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
    from flax import nnx
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
        images = to_uint8(decode(model, codes))
        for (name, _), img in zip(chunk, images):
            path = os.path.join(out, name + ".png")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            Image.fromarray(img).save(path)
            n += 1
    return n


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["encode", "decode", "ceiling"])
    p.add_argument("--images", help="encode: folder of images")
    p.add_argument("--codes", help="decode: ArrayRecord file of codes")
    p.add_argument("--out", help="encode: ArrayRecord file to write; decode: folder for PNGs")
    p.add_argument("--per_task", type=int, default=16, help="ceiling: prompts per GenEval task")
    p.add_argument("--usage_images", type=int, default=1024, help="ceiling: renders for codebook usage")
    p.add_argument("--workdir", help="a star_jax run: the VQ of its newest vq (or later stage) checkpoint")
    p.add_argument("--weights", help="VQ weights (.safetensors / .pt, reference names)")
    p.add_argument("--size", help="size-table name (configs/sizes.py): the config, or a random init without --weights")
    p.add_argument("--image_size", type=int, help="override the VQ's image_size (encode resize target)")
    p.add_argument("--attn_heads", type=int, help="attention heads (not stored in a state dict; default 8)")
    p.add_argument("--norm_groups", type=int, help="GroupNorm groups (not stored in a state dict; default 32)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="random init seed (--size without --weights)")
    return p


def main(argv: list[str]) -> int:
    """Entry point; argv[0] is the program name."""
    prog = argv[0] if argv else "star-jax vq"
    parser = _parser(prog)
    args = parser.parse_args(argv[1:])
    if args.action == "encode" and not args.images:
        parser.error("encode needs --images DIR")
    if args.action == "decode" and not args.codes:
        parser.error("decode needs --codes FILE")
    if args.action != "ceiling" and not args.out:
        parser.error(f"{args.action} needs --out")
    overrides = {k: getattr(args, k) for k in ("image_size", "attn_heads", "norm_groups") if getattr(args, k)}
    overrides["dtype"] = args.dtype
    try:
        if args.workdir and (args.weights or args.size):
            raise ValueError("give one of --workdir, --weights and --size")
        model = (
            model_from_workdir(args.workdir)
            if args.workdir
            else build_model(args.weights, args.size, args.seed, **overrides)
        )
        if args.action == "encode":
            n = encode_folder(model, args.images, args.out, args.batch_size)
            g = model.cfg.grid_size
            print(f"encoded {n} images to {args.out} ({g}x{g} codes each)")
        elif args.action == "decode":
            n = decode_codes_to_folder(model, args.codes, args.out, args.batch_size)
            print(f"decoded {n} images to {args.out}")
        else:
            from star_jax.eval import shapes_world

            r = shapes_world.vq_report(model, per_task=args.per_task, usage_images=args.usage_images)
            print(r["table"])
            print(
                f"VQ ceiling: ShapeEval overall {r['summary']['overall']:.3f}, PSNR {r['psnr']:.2f} dB "
                f"({6 * args.per_task} validation renders); over {args.usage_images} renders: codebook usage "
                f"{r['codebook_usage']:.3f}, token entropy {r['token_entropy_bits']:.2f} bits, "
                f"{r['background_codes']} distinct codes for all-background cells"
            )
    except (OSError, ValueError, KeyError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
