r"""Converts a user's data into the ArrayRecord layout of star_jax.records (a tfds dataset directory).

  # image-text pairs: a folder of images + JSONL lines {"image": "<path under images_dir>", "caption": "..."}
  python data/convert.py pairs --images_dir imgs/ --jsonl captions.jsonl --out_dir out/ --name my_pairs

  # edit triplets: JSONL lines {"source": "<path>", "instruction": "...", "target": "<path>"}
  python data/convert.py edits --images_dir imgs/ --jsonl edits.jsonl --out_dir out/ --name my_edits

  # question answering: JSONL lines {"image": "<path>", "question": "...", "answer": "..."}
  python data/convert.py qa --images_dir imgs/ --jsonl qa.jsonl --out_dir out/ --name my_qa

Each line goes to `validation` when crc32(its first image path) falls under --validation_fraction,
else to `train`. Bad lines (not JSON, non-UTF-8, a missing key or file, an unreadable, too small or
too elongated image (--min_image_size, --max_aspect_ratio, --max_image_size), empty text) are skipped,
counted, logged and written to `<dataset dir>/conversion_report.json`; the command fails when more than
--max_bad_fraction are bad. Images are read by star_jax.images.load_image: kept as they are when plain
8-bit RGB PNG / JPEG, otherwise stored as RGB PNG (16-bit scaled, transparency composited onto
--background, palette / grey / CMYK converted, EXIF orientation applied).
The printed dataset directory is what `config.data.path` takes.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import zlib

from star_jax import images, records

# JSONL key -> (record field, "image" | "text") per kind
LAYOUTS = {
    "pairs": {"image": ("image", "image"), "caption": ("caption", "text")},
    "qa": {"image": ("image", "image"), "question": ("question", "text"), "answer": ("answer", "text")},
    "edits": {
        "source": ("source_image", "image"),
        "instruction": ("instruction", "text"),
        "target": ("target_image", "image"),
    },
}


class BadLine(ValueError):
    """A JSONL line that cannot become a record; `reason` names the counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# images.ImageError.reason -> the counter of the skipped line
IMAGE_REASONS = {"unreadable": "missing_file", **{k: v for k, v in records.IMAGE_REASONS.items() if k != "unreadable"}}


def load_image(
    images_dir: str,
    rel: str,
    field: str,
    *,
    min_size: int,
    max_aspect: float,
    max_size: int | None = None,
    background: tuple[int, int, int] = images.WHITE,
) -> bytes:
    """The encoded bytes of image `rel`: kept as they are when a plain 8-bit RGB PNG / JPEG, otherwise
    read by `images.load_image` (16-bit scaled, alpha composited onto `background`, palette / grey /
    CMYK converted, EXIF orientation applied) and stored as an RGB PNG; raises BadLine."""
    if not isinstance(rel, str) or not rel:
        raise BadLine("missing_field", f"{field}: {rel!r} is not a file path")
    path = os.path.join(images_dir, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = images.load_image(
            data, name=path, min_size=min_size, max_size=max_size, max_aspect=max_aspect, background=background
        )
    except OSError as e:
        raise BadLine("missing_file", f"{field}: {path}: {e.strerror or type(e).__name__}") from None
    except images.ImageError as e:
        raise BadLine(IMAGE_REASONS[e.reason], f"{field}: {e}") from None
    return data if images.is_plain_rgb(data) else records.encode_png(image)


def parse_line(raw: bytes, kind: str, images_dir: str, *, min_size: int = 16, max_aspect: float = 4.0, **image) -> dict:
    """One JSONL line (bytes) -> a record dict of `kind` (records.features layout); raises BadLine.
    `image` (max_size, background) goes to `load_image`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("non_utf8_text", f"byte {e.start}: {raw[max(0, e.start - 10) : e.start + 10]!r}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine("bad_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise BadLine("bad_json", f"a line is a {type(obj).__name__}, expected an object")
    record = {}
    for key, (name, typ) in LAYOUTS[kind].items():
        if key not in obj:
            raise BadLine("missing_field", f"{key!r} not in line (keys: {sorted(obj)})")
        if typ == "image":
            record[name] = load_image(images_dir, obj[key], key, min_size=min_size, max_aspect=max_aspect, **image)
        else:
            try:
                record[name] = records.decode_text(obj[key], key)
            except records.BadRecord as e:
                raise BadLine(e.reason, e.detail) from None
    if kind == "pairs":
        record["metadata"] = records.json_dumps(obj.get("metadata", {}))
    return record


def split_of(raw: bytes, kind: str, validation_fraction: float) -> str:
    """'validation' or 'train', from crc32 of the line's first image path (stable across runs)."""
    try:
        key = str(json.loads(raw.decode("utf-8")).get(next(iter(LAYOUTS[kind])), ""))
    except Exception:
        key = raw.decode("latin-1")  # bad lines still need a split to be counted once
    return "validation" if zlib.crc32(key.encode()) % 10_000 < validation_fraction * 10_000 else "train"


class Converter:
    """Reads the JSONL once per split; counts good and bad lines (by reason); keeps examples of errors."""

    def __init__(self, kind: str, images_dir: str, jsonl: str, *, validation_fraction: float, **image):
        if kind not in LAYOUTS:
            raise ValueError(f"kind {kind!r} is unknown; known: {sorted(LAYOUTS)}")
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(f"JSONL file {jsonl!r} does not exist")
        self.kind, self.images_dir, self.jsonl = kind, images_dir, jsonl
        self.validation_fraction, self.image = validation_fraction, image  # load_image's limits and background
        self.good = 0
        self.bad = collections.Counter()
        self.errors: list[str] = []

    def examples(self, split: str):
        """Yields (line number, record) of `split`; bad lines are counted, logged and skipped."""
        with open(self.jsonl, "rb") as f:
            for number, raw in enumerate(f, start=1):
                raw = raw.rstrip(b"\r\n")
                if not raw.strip() or split_of(raw, self.kind, self.validation_fraction) != split:
                    continue
                try:
                    record = parse_line(raw, self.kind, self.images_dir, **self.image)
                except BadLine as e:
                    self.bad[e.reason] += 1
                    message = f"{self.jsonl}:{number}: {e}"
                    if len(self.errors) < 100:
                        self.errors.append(message)
                        logging.warning("convert: skipped %s", message)
                    continue
                self.good += 1
                yield number, record

    def report(self) -> dict:
        total = self.good + sum(self.bad.values())
        return {
            "good": self.good,
            "bad": sum(self.bad.values()),
            "bad_fraction": sum(self.bad.values()) / max(total, 1),
            "bad_by_reason": dict(self.bad),
            "first_errors": self.errors,
        }


def convert(
    kind: str,
    images_dir: str,
    jsonl: str,
    out_dir: str,
    name: str,
    *,
    validation_fraction: float = 0.01,
    max_bad_fraction: float = 0.01,
    min_size: int = 16,
    max_aspect: float = 4.0,
    max_size: int | None = None,
    background: tuple[int, int, int] = images.WHITE,
) -> tuple[str, dict]:
    """Converts `jsonl` (+ images under `images_dir`) into `<out_dir>/<name>/<kind>/1.0.0`.
    Returns (dataset directory, report). Raises records.BadDataError when too many lines are bad.
    Images: shorter side >= `min_size`, longer side <= `max_size` (None: no limit), long / short
    <= `max_aspect`; transparent pixels are composited onto `background`."""
    limits = dict(min_size=min_size, max_aspect=max_aspect, max_size=max_size, background=tuple(background))
    converter = Converter(kind, images_dir, jsonl, validation_fraction=validation_fraction, **limits)
    with open(jsonl, "rb") as f:  # tfds needs every split it writes to be non-empty
        present = {split_of(raw.rstrip(b"\r\n"), kind, validation_fraction) for raw in f if raw.strip()}
    splits = {split: converter.examples(split) for split in ("train", "validation") if split in present}
    try:
        directory = records.write_dataset(out_dir, name, kind, splits, description=f"converted from {jsonl}")
    except AssertionError as e:  # tfds: a split whose lines were all bad
        raise records.BadDataError(f"{jsonl}: {e}; bad lines so far: {dict(converter.bad)}") from None
    report = converter.report()
    with open(os.path.join(directory, "conversion_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    logging.info(
        "convert: %d records, %d bad lines %s -> %s", report["good"], report["bad"], report["bad_by_reason"], directory
    )
    if report["bad_fraction"] > max_bad_fraction:
        raise records.BadDataError(
            f"{jsonl}: {report['bad']} of {report['good'] + report['bad']} lines are bad "
            f"({report['bad_fraction']:.2%} > --max_bad_fraction={max_bad_fraction:.2%}): {report['bad_by_reason']}; "
            f"see {directory}/conversion_report.json"
        )
    return directory, report


def parse_colour(text: str) -> tuple[int, int, int]:
    """'R,G,B' (0..255 each) -> (r, g, b); raises app.UsageError naming --background otherwise."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise app.UsageError(f"--background={text!r}: expected R,G,B with each in 0..255, e.g. 255,255,255")
    return tuple(int(p) for p in parts)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in LAYOUTS:
        raise app.UsageError(f"usage: convert.py {{{'|'.join(LAYOUTS)}}} --images_dir D --jsonl F --out_dir O")
    f = flags.FLAGS
    directory, report = convert(
        argv[1],
        f.images_dir,
        f.jsonl,
        os.path.expanduser(f.out_dir),
        f.name or f"user_{argv[1]}",
        validation_fraction=f.validation_fraction,
        max_bad_fraction=f.max_bad_fraction,
        min_size=f.min_image_size,
        max_aspect=f.max_aspect_ratio,
        max_size=f.max_image_size or None,
        background=parse_colour(f.background),
    )
    print(json.dumps({k: v for k, v in report.items() if k != "first_errors"}))
    print(directory)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("images_dir", ".", "directory the JSONL image paths are relative to")
    flags.DEFINE_string("jsonl", None, "JSONL file, one record per line", required=True)
    flags.DEFINE_string("out_dir", None, "tfds data_dir to write under", required=True)
    flags.DEFINE_string("name", "", "dataset name (default user_<kind>)")
    flags.DEFINE_float("validation_fraction", 0.01, "fraction of lines held out as the validation split")
    flags.DEFINE_float("max_bad_fraction", 0.01, "fail when more than this fraction of lines is bad")
    flags.DEFINE_integer("min_image_size", 16, "smallest accepted image side, pixels")
    flags.DEFINE_float("max_aspect_ratio", 4.0, "largest accepted long side / short side")
    flags.DEFINE_integer("max_image_size", 0, "largest accepted image side, pixels (0: no limit)")
    flags.DEFINE_string(
        "background", "255,255,255", "R,G,B that transparent pixels are composited onto (shapes world: 128,128,128)"
    )
    sys.exit(app.run(main))
