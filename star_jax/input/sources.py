"""Where records come from: random-access sources of decoded (or serialised) records, by name.

`make_source(config, split, stage)` -> (source, parser): `source[i]` is a record of the kind the stage
reads (`stage.reads`: pairs | qa | edits), `len(source)` the split's size, and `parser` turns a
serialised record (bytes) into a dict, or is None when the source yields dicts. `config.data.source`
names the source:

  shapes       the procedurally generated shapes world (`ShapesSource`: random access by index, no
               files, a pure function of (split, index, seed))
  arrayrecord  a tfds ArrayRecord dataset directory (`config.data.path`): data/shapes_world.py
               output, user data converted by data/convert.py, VQ-pretokenised records
  <other>      a source a project registers (`register_source`) in a module named in `config.imports`

Record fields (`star_jax.records` documents the on-disk layout):
  pairs  image uint8 [R, R, 3], caption str, metadata str (JSON), objects str (JSON, shapes world:
         `[[shape, colour, x, y, size], ...]`, the scene itself)
  qa     image, question str, answer str [, follow_ups str (JSON `[[question, answer], ...]`)]
  edits  source_image, instruction str, target_image
"""

from __future__ import annotations

from collections.abc import Callable

from star_jax import records, shapes

SHAPES_KIND = {"pairs": "pair", "qa": "qa", "edits": "edit"}  # star_jax.shapes.make_example kinds

# (config, split, stage, render_size) -> (source, parser or None)
SourceFactory = Callable[[object, str, object, int], tuple]


class ShapesSource:
    """The procedurally generated shapes world as a random-access source of decoded records.

    [i] -> the record of `kind` (pairs | qa | edits; see the module docstring) with uint8
    [resolution, resolution, 3] images and str text: `star_jax.shapes.make_example(split, i, ...)`, a
    pure function of (split, i, seed).
    """

    def __init__(self, split: str, kind: str, num_examples: int, *, resolution: int, seed: int = 0):
        if kind not in SHAPES_KIND:
            raise ValueError(f"record kind {kind!r} is unknown; known: {tuple(SHAPES_KIND)}")
        self.split, self.kind, self.num_examples = split, kind, num_examples
        self.resolution, self.seed = resolution, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        ex = self.example(index, SHAPES_KIND[self.kind])
        if self.kind == "pairs":
            return pair_record(ex)
        if self.kind == "qa":
            return {k: ex[k] for k in ("image", "question", "answer")}
        return {k: ex[k] for k in ("source_image", "instruction", "target_image")}

    def example(self, index: int, kind: str, tag: str | None = None) -> dict:
        """`shapes.make_example` of this source's split, seed and resolution (kind: pair | qa | edit)."""
        return shapes.make_example(self.split, int(index), kind, seed=self.seed, resolution=self.resolution, tag=tag)


def pair_record(ex: dict) -> dict:
    """A shapes-world 'pair' example (`shapes.make_example`) -> the pairs record: image uint8
    [R, R, 3], caption, metadata (JSON) and objects (JSON `[[shape, colour, x, y, size], ...]`)."""
    objects = [[o.shape, o.color, o.x, o.y, o.size] for o in ex["scene"].objects]
    return {
        "image": ex["image"],
        "caption": ex["caption"],
        "metadata": records.json_dumps(ex["metadata"]),
        "objects": records.json_dumps(objects),
    }


def render_size(config, stage) -> int:
    """Side in pixels the shapes world renders at for `stage` (a `stages.Stage`): the largest of the
    VQ's input (`stage.vq_images`) and the ViT's (`stage.uses_vit`); the VQ's when neither."""
    sizes = [config.model.vq.image_size] if stage.vq_images else []
    sizes += [config.data.vit_image_size] if stage.uses_vit else []
    return max(sizes, default=config.model.vq.image_size)


def split_size(config, split: str) -> int:
    """Records in a procedurally generated split: data.num_train_examples or data.num_eval_examples."""
    return config.data.num_train_examples if split == "train" else config.data.num_eval_examples


def _shapes(config, split: str, stage, resolution: int):
    if config.data.pretokenized:
        raise ValueError("config.data.pretokenized=True needs source='arrayrecord' (data/pretokenize_vq.py output)")
    source = ShapesSource(split, stage.reads, split_size(config, split), resolution=resolution, seed=config.seed)
    return source, None


def _arrayrecord(config, split: str, stage, resolution: int):
    if not config.data.path:
        raise ValueError("config.data.source='arrayrecord' needs config.data.path (a tfds dataset directory)")
    directory = records.resolve_dataset_dir(config.data.path, stage.reads)
    return records.ArrayRecordSource(directory, split), records.RecordParser(directory)


_SOURCES: dict[str, SourceFactory] = {"shapes": _shapes, "arrayrecord": _arrayrecord}


def register_source(name: str, factory: SourceFactory) -> SourceFactory:
    """Makes `config.data.source = name` use `factory(config, split, stage, render_size) -> (source,
    parser or None)` (a project module calls this at import). Returns the factory."""
    if _SOURCES.get(name, factory) is not factory:
        raise ValueError(f"data source {name!r} is already registered")
    _SOURCES[name] = factory
    return factory


def source_names() -> tuple[str, ...]:
    """The known values of `config.data.source`, built-in first."""
    return tuple(_SOURCES)


def make_source(config, split: str, stage):
    """(source, parser) of `split` for `stage` (a `stages.Stage`: its `reads`, `uses_vit`, `vq_images`):
    a random-access source (len, [i] -> record or bytes) and the bytes -> record parser (or None)."""
    name = config.data.source
    if name not in _SOURCES:
        raise ValueError(
            f"config.data.source={name!r} is not a data source; known: {', '.join(source_names())} "
            "(a project's source is registered by a module named in config.imports)"
        )
    return _SOURCES[name](config, split, stage, render_size(config, stage))
