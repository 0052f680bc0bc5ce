r"""VQ pre-tokenisation: a pairs / edits dataset -> the same records plus their VQ code ids, so that
large runs never run the VQ encoder in the training step (`config.data.pretokenized=True`).

  python data/pretokenize_vq.py --config configs/star.py:size=shapes,stage=generation \
      --workdir runs/shapes --vq_from vq --input <dataset dir> --out_dir <data_dir> --name shapes_vq

`--vq_from`: a stage name under --workdir (the VQ stage's final params), `vq:<file.safetensors>`
(reference STAR-VQ weights), or `random` (an untrained VQ seeded by config.seed: tests and demos
only). Images are prepared exactly as the input pipeline prepares them (centre square crop,
bicubic resize to config.model.vq.image_size, [-1, 1]), so the codes equal the on-the-fly ones.
Records with unusable images are skipped and counted (printed at the end). Output:
`<out_dir>/<name>/<kind>/1.0.0` with `codes` (pairs) or `source_codes` / `target_codes` (edits),
int32 [N] in raster order.
"""

from __future__ import annotations

import collections
import logging
import os
import sys

import jax
import numpy as np
from flax import nnx

from star_jax import images as image_lib
from star_jax import init_sources, records, sharding
from star_jax.models import star

IMAGE_CODES = {"pairs": {"image": "codes"}, "edits": {"source_image": "source_codes", "target_image": "target_codes"}}


def build_encoder(config, vq_from: str, workdir: str = ""):
    """The jitted encoder of the config's VQ with weights from `vq_from`:
    images [B, H, W, 3] float32 in [-1, 1] -> codes [B, N] int32 (raster order)."""
    mesh, rules = sharding.single_device_mesh(), sharding.rules_from_config(config)
    model = sharding.create_sharded(lambda: star.build(config, ("vq",), rngs=nnx.Rngs(config.seed)), mesh, rules)
    with sharding.use_mesh(mesh, rules):
        if vq_from != "random":
            init_sources.load_source(model, workdir, vq_from)
    graphdef, state = nnx.split(model.vq)

    @jax.jit
    def encode(state, images):
        return nnx.merge(graphdef, state).encode_to_codes(images).reshape(images.shape[0], -1)

    def run(images: np.ndarray) -> np.ndarray:
        with sharding.use_mesh(mesh, rules):
            return np.asarray(encode(state, images))

    return run


class Pretokenizer:
    """Adds codes to the records of one dataset; counts skipped records by reason."""

    def __init__(self, config, dataset_dir: str, encode, *, batch_size: int = 32):
        self.dataset_dir, self.encode, self.batch_size = dataset_dir, encode, batch_size
        keys = set(records.load_features(dataset_dir).keys())
        self.kind = "pairs" if "caption" in keys else "edits" if "instruction" in keys else None
        if self.kind is None:
            raise ValueError(
                f"{dataset_dir}: fields {sorted(keys)} are neither pairs (caption) nor edits (instruction)"
            )
        self.size = config.model.vq.image_size
        self.min_size = config.data.min_image_size
        self.max_aspect = config.data.max_aspect_ratio
        self.skipped = collections.Counter()
        self.written = 0

    def _images(self, record: dict) -> list[np.ndarray]:
        out = []
        for name in IMAGE_CODES[self.kind]:
            image = records.decode_image(
                records.field(record, name), name, min_size=self.min_size, max_aspect=self.max_aspect
            )
            out.append(
                image_lib.to_unit_range(image_lib.resize_square(image, self.size, crop=True, resample="bilinear"))
            )
        return out

    def _flush(self, batch: list):
        """Encodes the images of `batch` [(key, record, images)], padded to a fixed batch size."""
        images = [im for _, _, ims in batch for im in ims]
        n = len(images)
        padded = np.stack(images + [images[0]] * (self.batch_size * len(IMAGE_CODES[self.kind]) - n))
        codes = self.encode(padded)[:n]
        per = len(IMAGE_CODES[self.kind])
        for i, (key, record, _) in enumerate(batch):
            for j, name in enumerate(IMAGE_CODES[self.kind].values()):
                record[name] = codes[i * per + j].astype(np.int32)
            self.written += 1
            yield key, record

    def examples(self, split: str):
        """Yields (index, record with codes) of `split`."""
        source, parse = records.ArrayRecordSource(self.dataset_dir, split), records.RecordParser(self.dataset_dir)
        batch = []
        for index in range(len(source)):
            try:
                record = parse(source[index])
                batch.append((index, record, self._images(record)))
            except records.BadRecord as e:
                self.skipped[e.reason] += 1
                logging.warning("pretokenize: %s[%d] skipped: %s", split, index, e)
                continue
            if len(batch) == self.batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)


def pretokenize(config, input_path: str, out_dir: str, name: str, encode, *, splits=None, batch_size: int = 32):
    """Writes `input_path`'s records + codes to `<out_dir>/<name>/<kind>/1.0.0`; returns
    (that directory, {'written': n, 'skipped': {reason: n}})."""
    dataset_dir = records.resolve_dataset_dir(input_path)
    tok = Pretokenizer(config, dataset_dir, encode, batch_size=batch_size)
    splits = splits or records.list_splits(dataset_dir)
    out = records.write_dataset(
        out_dir,
        name,
        tok.kind,
        {s: tok.examples(s) for s in splits},
        pretokenized=True,
        description=f"VQ codes of {dataset_dir}",
    )
    return out, {"written": tok.written, "skipped": dict(tok.skipped)}


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    config = f.config
    encode = build_encoder(config, f.vq_from, f.workdir)
    splits = f.splits.split(",") if f.splits else None
    out, report = pretokenize(
        config, f.input, os.path.expanduser(f.out_dir), f.name, encode, splits=splits, batch_size=f.batch_size
    )
    print(report)
    print(out)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/star.py:size=..,stage=..", lock_config=False)
    flags.DEFINE_string("workdir", "", "workdir holding the stage checkpoint named by --vq_from")
    flags.DEFINE_string("vq_from", "vq", "stage name under --workdir, vq:<file>, or random")
    flags.DEFINE_string("input", None, "dataset directory (or tfds data_dir) to read", required=True)
    flags.DEFINE_string("out_dir", None, "tfds data_dir to write under", required=True)
    flags.DEFINE_string("name", "pretokenized", "output dataset name")
    flags.DEFINE_string("splits", "", "comma-separated splits (default: all)")
    flags.DEFINE_integer("batch_size", 32, "records per encoder call")
    sys.exit(app.run(main))
