"""Sample grids during training: what the stack draws, watched as it trains.

Every `config.train.sample_every` steps (and at the last step) the generation stage draws one image
for each of the first `config.train.sample_num` captions of the validation split, and the editing
stage edits the first `sample_num` validation sources. The grid (generation: one row of images;
editing: sources, edits, targets as three rows) goes to `<workdir>/<stage>/samples_<step>.png` and,
when TensorFlow is installed, to TensorBoard (`metrics.Writer.images`). Sampling uses its own seeds
and reads the validation split, so a run trains the same with sampling on or off.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from star_jax import records

Sampler = Callable[[object, int], np.ndarray]  # (model, step) -> uint8 grid [H, W, 3]


def validation_records(config, num: int, *, max_tries: int = 1000) -> list[dict]:
    """The first `num` usable records of the stage's validation split, decoded: uint8 images
    squared to the VQ's size [S, S, 3] and str text. Records that do not decode are passed over;
    fewer than `num` usable records in `max_tries` raise ValueError naming the split."""
    from star_jax import input_pipeline

    spec = input_pipeline.ExampleSpec.from_config(config)
    prepare = input_pipeline.PrepareExample(*input_pipeline.make_source(config, "validation", spec), spec)
    size = config.model.vq.image_size
    fields = {"pairs": ("caption",), "edits": ("instruction",)}[spec.kind]
    images = {"pairs": (), "edits": ("source_image", "target_image")}[spec.kind]
    out = []
    for index in range(min(len(prepare.source), max_tries)):
        try:
            record = prepare.read(index)
            row = {name: records.decode_text(records.field(record, name), name) for name in fields}
            row |= {name: records.square_image(prepare.image(record, name), size) for name in images}
        except records.BadRecord:
            continue
        out.append(row)
        if len(out) == num:
            return out
    raise ValueError(
        f"the validation split of config.data (source={config.data.source!r}) has fewer than {num} usable records"
    )


def make_sampler(config) -> Sampler | None:
    """The sampler of a generation or editing stage, or None when `train.sample_every` is 0 or the
    stage draws no images. Its records are read once, here."""
    every = config.train.get("sample_every", 0)
    if not every or config.stage not in ("generation", "editing"):
        return None
    from star_jax import input_pipeline
    from star_jax.decode import runner as runner_lib
    from star_jax.metrics import image_grid

    num = config.train.get("sample_num", 8)
    rows = validation_records(config, num)
    tok = input_pipeline.load_tokenizer(config.data.tokenizer)
    sampling = dict(cfg=config.train.get("sample_cfg", 3.0), seed=config.seed)

    def sample(model, step: int) -> np.ndarray:
        runner = runner_lib.StarRunner(model, config, tok)
        if config.stage == "generation":
            images, _ = runner.text_to_image([r["caption"] for r in rows], **sampling)
            return image_grid(images, cols=num)
        sources = np.stack([r["source_image"] for r in rows])
        edited = runner.edit(sources, [r["instruction"] for r in rows], **sampling)
        targets = np.stack([r["target_image"] for r in rows])
        return image_grid(np.concatenate([sources, edited, targets]), cols=num)

    return sample
