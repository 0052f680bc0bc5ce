r"""tfds builder of the shapes world (ArrayRecord files; no TensorFlow needed).

Configs: `pairs` (image, caption, GenEval metadata), `qa` (image, question, answer), `edits`
(source_image, instruction, target_image). Splits: train, validation, heldout (held-out
colour-shape pairs / triples; see star_jax.shapes). Images are PNG bytes (records.features).
Examples are star_jax.shapes.make_example(split, index, kind, seed), so the records equal what the
input pipeline's procedural source yields for the same seed and resolution.

  python data/shapes_world.py --data_dir ~/tensorflow_datasets --config pairs \
      --num_train 100000 --num_validation 1000 --num_heldout 1000 --resolution 64

Then train with `--config.data.source=arrayrecord --config.data.path=<data_dir>/shapes_world/pairs/1.0.0`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import tensorflow_datasets as tfds

from star_jax import records

SHAPES_KIND = {"pairs": "pair", "qa": "qa", "edits": "edit"}


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A record kind and the split sizes / resolution / world seed."""

    kind: str = "pairs"
    num_train: int = 10_000
    num_validation: int = 500
    num_heldout: int = 500
    resolution: int = 64
    seed: int = 0


def shapes_record(kind: str, split: str, index: int, *, resolution: int, seed: int) -> dict:
    """One record of `kind` (records.features layout): PNG images, text, JSON metadata."""
    from star_jax import shapes

    ex = shapes.make_example(split, index, SHAPES_KIND[kind], seed=seed, resolution=resolution)
    if kind == "pairs":
        return {
            "image": records.encode_png(ex["image"]),
            "caption": ex["caption"],
            "metadata": records.json_dumps(ex["metadata"]),
        }
    if kind == "qa":
        return {"image": records.encode_png(ex["image"]), "question": ex["question"], "answer": ex["answer"]}
    return {
        "source_image": records.encode_png(ex["source_image"]),
        "instruction": ex["instruction"],
        "target_image": records.encode_png(ex["target_image"]),
    }


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The shapes world: pairs / qa / edits, train / validation / heldout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ShapesWorldConfig(name=k, kind=k, description=f"shapes world {k}") for k in records.KINDS]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=records.features(self.builder_config.kind),
            disable_shuffling=True,  # record i of a split is make_example(split, i)
            metadata=tfds.core.MetadataDict(
                resolution=self.builder_config.resolution, seed=self.builder_config.seed, kind=self.builder_config.kind
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the world is procedural
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "heldout": c.num_heldout}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_examples: int):
        c = self.builder_config
        for index in range(num_examples):
            yield index, shapes_record(c.kind, split, index, resolution=c.resolution, seed=c.seed)


def build(data_dir: str, kind: str = "pairs", **sizes) -> str:
    """Builds config `kind` (with optional split sizes / resolution / seed overrides) under
    `data_dir`; returns the dataset directory (holding features.json and the ArrayRecord files)."""
    config = ShapesWorldConfig(name=kind, kind=kind, **sizes)
    if config != ShapesWorldConfig(name=kind, kind=kind):  # non-default sizes get their own directory
        c = config
        name = f"{kind}_n{c.num_train}_{c.num_validation}_{c.num_heldout}_r{c.resolution}_s{c.seed}"
        config = dataclasses.replace(config, name=name)
    builder = ShapesWorld(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(builder.data_dir)


def main(argv: list[str]) -> None:
    del argv
    c = FLAGS
    sizes = dict(
        num_train=c.num_train,
        num_validation=c.num_validation,
        num_heldout=c.num_heldout,
        resolution=c.resolution,
        seed=c.seed,
    )
    print(build(os.path.expanduser(c.data_dir), c.config, **sizes))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "tfds data_dir to write under")
    flags.DEFINE_enum("config", "pairs", list(records.KINDS), "record kind")
    flags.DEFINE_integer("num_train", 10_000, "train examples")
    flags.DEFINE_integer("num_validation", 500, "validation examples")
    flags.DEFINE_integer("num_heldout", 500, "heldout examples")
    flags.DEFINE_integer("resolution", 64, "image side in pixels")
    flags.DEFINE_integer("seed", 0, "shapes world seed")
    FLAGS = flags.FLAGS
    sys.exit(app.run(main))
