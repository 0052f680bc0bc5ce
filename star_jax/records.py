"""Records: the on-disk layout of every dataset, and the validation that turns a bad record into a
counted skip instead of a crash.

Layout: a tfds dataset directory (`features.json`, `dataset_info.json`,
`<name>-<split>.array_record-NNNNN-of-MMMMM`), written by the shapes-world builder
(data/shapes_world.py), by the converters of user data (data/convert.py) and by VQ pre-tokenisation
(data/pretokenize_vq.py). Records are tfds-serialised examples; no TensorFlow is needed to write or
read them. Images are stored encoded (PNG / JPEG bytes), text as UTF-8, codes as int32 vectors:

  pairs  image bytes, caption text, metadata text (JSON) [+ codes [N] int32]
  qa     image bytes, question text, answer text
  edits  source_image bytes, instruction text, target_image bytes
         [+ source_codes [N] int32, target_codes [N] int32]

Validation (`decode_image`, `decode_text`, `check_codes`) raises `BadRecord(reason, detail)` with
one of `REASONS`; the input pipeline maps it to a sentinel, drops it and counts it by reason.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import threading

import numpy as np
from PIL import Image

from star_jax import images as image_lib

KINDS = ("pairs", "qa", "edits")
# Why a record was skipped; the input pipeline counts skips per reason (metric `data/bad/<reason>`).
REASONS = (
    "corrupt_record",  # the serialised example does not parse
    "missing_field",  # a field the stage needs is absent
    "corrupt_image",  # image bytes do not decode (garbage, truncated, unknown format)
    "image_channels",  # an array that is not uint8 [H, W, 3], or pixels with no 8-bit meaning (float)
    "image_size",  # smaller than the minimum side, a too extreme aspect ratio, or a decompression bomb
    "empty_text",  # empty or whitespace-only caption / question / answer / instruction
    "non_utf8_text",  # text bytes that are not UTF-8
    "bad_codes",  # VQ code ids out of [0, codebook_size) or the wrong count
    "too_long",  # the assembled prompt exceeds max_prompt_len
    "other",  # any other exception raised while preparing the example
)
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is one of REASONS, the message names field and value."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASON_INDEX:
            raise ValueError(f"unknown bad-record reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadDataError(RuntimeError):
    """Too large a fraction of the records is bad: the run stops."""


# ------------------------------------------------------------------------------------------------
# Features (tfds) of each kind


def features(kind: str, *, pretokenized: bool = False):
    """The tfds FeaturesDict of records of `kind` (pairs | qa | edits); `pretokenized` adds codes."""
    import tensorflow_datasets as tfds

    image = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded bytes
    text = tfds.features.Text
    codes = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)
    if kind == "pairs":
        spec = {"image": image(), "caption": text(), "metadata": text()}
        if pretokenized:
            spec["codes"] = codes()
    elif kind == "qa":
        spec = {"image": image(), "question": text(), "answer": text()}
    elif kind == "edits":
        spec = {"source_image": image(), "instruction": text(), "target_image": image()}
        if pretokenized:
            spec |= {"source_codes": codes(), "target_codes": codes()}
    else:
        raise ValueError(f"record kind {kind!r} is unknown; known: {KINDS}")
    return tfds.features.FeaturesDict(spec)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Validation


# images.ImageError.reason -> the BadRecord reason it is counted under
IMAGE_REASONS = {
    "unreadable": "corrupt_image",
    "not_image": "corrupt_image",
    "corrupt": "corrupt_image",
    "mode": "image_channels",
    "too_small": "image_size",
    "too_large": "image_size",
    "aspect": "image_size",
}


def decode_image(value, field: str, *, min_size: int = 16, max_aspect: float = 4.0) -> np.ndarray:
    """An encoded image (bytes) or a uint8 array -> uint8 [H, W, 3]; raises BadRecord otherwise.
    Bytes are read by `images.load_image` (16-bit scaled, alpha over white, palette / grey / CMYK
    converted, EXIF orientation applied); a plain 8-bit RGB PNG or JPEG decodes as PIL stores it."""
    try:
        if isinstance(value, np.ndarray) and value.dtype != object:
            image = value
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise BadRecord(
                    "image_channels", f"{field}: array {image.dtype}{list(image.shape)}, expected uint8 [H, W, 3]"
                )
            image_lib.check_size(*image.shape[:2], name=field, min_size=min_size, max_aspect=max_aspect)
            return image
        data = value.item() if isinstance(value, np.ndarray) else value
        if not isinstance(data, bytes | bytearray) or not data:
            raise BadRecord("corrupt_image", f"{field}: {type(data).__name__} of length {len(data or b'')}")
        return image_lib.load_image(data, name=field, min_size=min_size, max_aspect=max_aspect)
    except image_lib.ImageError as e:
        raise BadRecord(IMAGE_REASONS[e.reason], str(e)) from None


def decode_text(value, field: str) -> str:
    """UTF-8 bytes / str -> stripped non-empty str; raises BadRecord otherwise."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("non_utf8_text", f"{field}: {bytes(value[:40])!r} is not UTF-8 ({e.reason})") from None
    if not isinstance(value, str):
        raise BadRecord("other", f"{field}: {type(value).__name__}, expected text")
    if not value.strip():
        raise BadRecord("empty_text", f"{field}: {value!r} is empty")
    return value.strip()


def check_codes(value, field: str, *, num_codes: int, codebook_size: int) -> np.ndarray:
    """Code ids (any int array) -> int32 [num_codes]; raises BadRecord when out of range or miscounted."""
    codes = np.asarray(value).reshape(-1)
    if codes.size != num_codes or not np.issubdtype(codes.dtype, np.integer):
        raise BadRecord("bad_codes", f"{field}: {codes.size} {codes.dtype} codes, expected {num_codes} integers")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise BadRecord("bad_codes", f"{field}: ids in [{lo}, {hi}] outside [0, {codebook_size})")
    return codes.astype(np.int32)


def decode_objects(value, field: str = "objects") -> list[tuple[str, str, float, float, float]]:
    """JSON text `[[shape, colour, x, y, size], ...]` (a shapes-world scene) -> list of tuples;
    raises BadRecord naming the field when it is not such a list (names are checked by the caller)."""
    text = decode_text(value, field)
    try:
        objects = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("corrupt_record", f"{field}: not JSON ({e.msg}): {text[:60]!r}") from None
    ok = lambda o: (
        isinstance(o, list)
        and len(o) == 5
        and all(isinstance(x, str) for x in o[:2])
        and all(isinstance(x, int | float) and 0.0 <= x <= 1.0 for x in o[2:])
    )
    if not isinstance(objects, list) or not all(ok(o) for o in objects):
        raise BadRecord(
            "corrupt_record", f"{field}: expected [[shape, colour, x, y, size], ...] in [0, 1], got {text[:60]!r}"
        )
    return [tuple(o) for o in objects]


def decode_turns(value, field: str = "follow_ups") -> tuple[tuple[str, str], ...]:
    """JSON text `[[question, answer], ...]` (later turns of an understanding chat) -> tuple of
    (question, answer) str pairs; raises BadRecord naming the field when it is not such a list."""
    text = decode_text(value, field)
    try:
        turns = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("corrupt_record", f"{field}: not JSON ({e.msg}): {text[:60]!r}") from None
    if not isinstance(turns, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) and x.strip() for x in t) for t in turns
    ):
        raise BadRecord("corrupt_record", f"{field}: expected [[question, answer], ...], got {text[:60]!r}")
    return tuple((q, a) for q, a in turns)


def field(record: dict, name: str):
    """record[name], or BadRecord('missing_field') naming the field and the fields present (tfds
    deserialises an absent feature as None)."""
    if record.get(name) is None:
        raise BadRecord(
            "missing_field", f"{name!r} not in record (fields: {sorted(k for k, v in record.items() if v is not None)})"
        )
    return record[name]


# ------------------------------------------------------------------------------------------------
# Dataset directories


def resolve_dataset_dir(path: str, kind: str | None = None) -> str:
    """The directory holding `features.json` for `path`: `path` itself, or the newest version of
    `<path>/**/<kind>*/<version>/` (a tfds data_dir holding several configs)."""
    if os.path.isfile(os.path.join(path, "features.json")):
        return path
    pattern = os.path.join(path, "**", f"{kind or ''}*", "*", "features.json")
    found = sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise FileNotFoundError(f"no dataset under {path!r}: no features.json there nor at {pattern!r}")
    return os.path.dirname(found[-1])


def list_splits(dataset_dir: str) -> list[str]:
    """Names of the splits that have ArrayRecord files in `dataset_dir` (`<name>-<split>.array_record-...`)."""
    names = (
        re.search(r"-(\w+)\.array_record-", os.path.basename(f))
        for f in glob.glob(os.path.join(dataset_dir, "*.array_record-*"))
    )
    return sorted({m.group(1) for m in names if m})


def split_files(dataset_dir: str, split: str) -> list[str]:
    """ArrayRecord shard files of `split` in `dataset_dir`; raises naming the splits present."""
    files = sorted(glob.glob(os.path.join(dataset_dir, f"*-{split}.array_record-*")))
    if not files:
        raise FileNotFoundError(
            f"dataset {dataset_dir!r} has no split {split!r}; splits present: {list_splits(dataset_dir)}"
        )
    return files


# Serialises the first tfds import of a process. Grain's prefetch threads parse records
# concurrently; two of them importing tensorflow_datasets at once deadlocked a worker process
# (etils' lazy-module property lock taken against the import lock, in the opposite order).
_TFDS_LOCK = threading.Lock()


def load_features(dataset_dir: str):
    """The tfds FeaturesDict saved in `dataset_dir/features.json`. Thread-safe: concurrent calls
    run one at a time."""
    with _TFDS_LOCK:
        import tensorflow_datasets as tfds

        return tfds.features.FeatureConnector.from_config(dataset_dir)


class ArrayRecordSource:
    """Random access to the serialised records (bytes) of one split: len() and [i] (Grain source)."""

    def __init__(self, dataset_dir: str, split: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.dataset_dir, self.split = dataset_dir, split
        self.files = split_files(dataset_dir, split)
        self._source = ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self._source[index]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.dataset_dir!r}, {self.split!r}, {len(self)} records)"


class RecordParser:
    """Serialised bytes -> dict of numpy values; raises BadRecord('corrupt_record') when they do not parse."""

    def __init__(self, dataset_dir: str):
        self.dataset_dir = dataset_dir
        self._features = None

    def __call__(self, data: bytes) -> dict:
        if self._features is None:  # lazily: the parser is pickled into Grain workers
            self._features = load_features(self.dataset_dir)
        try:
            return dict(self._features.deserialize_example_np(data))
        except Exception as e:
            raise BadRecord("corrupt_record", f"{len(data)} bytes do not parse ({type(e).__name__}: {e})") from None

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "_features": None}


def write_dataset(
    out_dir: str, name: str, kind: str, splits: dict, *, pretokenized: bool = False, description: str = ""
) -> str:
    """Writes `splits` {split: iterable of (key, example dict)} as a tfds ArrayRecord dataset
    `<out_dir>/<name>/<kind>/1.0.0` (converters, VQ pre-tokenisation) in the order given; returns
    that directory."""
    import tensorflow_datasets as tfds

    class _Records(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # no checksums file (tfds would look it up next to the defining module)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind, description=description)]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=features(kind, pretokenized=pretokenized),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(examples) for split, examples in splits.items()}

        def _generate_examples(self, examples):
            yield from examples

    _Records.name = name
    builder = _Records(config=kind, data_dir=out_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(builder.data_dir)


def json_dumps(obj) -> str:
    """Compact, deterministic JSON (record metadata)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
