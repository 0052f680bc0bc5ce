"""Sample grids during training: what the stack draws, watched as it trains.

Every `config.train.sample_every` steps (and at the last step) the generation stage draws one image
for each of the first `config.train.sample_num` captions of the validation split
(`generation_sampler`), and the editing stage edits the first `sample_num` validation sources
(`editing_sampler`). The grid (generation: one row of images; editing: sources, edits, targets as
three rows) goes to `<workdir>/<stage>/samples_<step>.png` and, when TensorFlow is installed, to
TensorBoard (`metrics.Writer.images`). Sampling uses its own seeds and reads the validation split
(through `input.sources` and `input.examples`, as the stage's pipeline reads it), so a run trains
the same with sampling on or off.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from star_jax import images as image_lib
from star_jax import metrics, records
from star_jax.decode import runner as runner_lib
from star_jax.input import examples, sources
from star_jax.text import tokenizer as tokenizer_lib

Sampler = Callable[[object, int], np.ndarray]  # (model, step) -> uint8 grid [H, W, 3]


def validation_records(
    config, num: int, stage, texts: tuple[str, ...], images: tuple[str, ...] = (), *, max_tries: int = 1000
) -> list[dict]:
    """The first `num` usable records of the validation split of `stage` (a `stages.Stage`), decoded:
    the `texts` fields as str and the `images` fields as uint8 [S, S, 3] squared to the VQ's size.
    Records that do not decode are passed over; fewer than `num` usable records in `max_tries` raise
    ValueError naming the source."""
    spec = examples.ExampleSpec.from_config(config, stage)
    prepare = examples.Prepare(*sources.make_source(config, "validation", stage), spec)
    size = config.model.vq.image_size
    out = []
    for index in range(min(len(prepare.source), max_tries)):
        try:
            record = prepare.read(index)
            row = {name: prepare.text(record, name) for name in texts}
            row |= {name: image_lib.resize_square(prepare.image(record, name), size, crop=True) for name in images}
        except records.BadRecord:
            continue
        out.append(row)
        if len(out) == num:
            return out
    raise ValueError(
        f"the validation split of config.data (source={config.data.source!r}) has fewer than {num} usable records"
    )


def _setup(config, stage, texts: tuple[str, ...], images: tuple[str, ...] = ()):
    """(rows, tokenizer, sampling kwargs, num), or None when `train.sample_every` is 0."""
    if not config.train.get("sample_every", 0):
        return None
    num = config.train.get("sample_num", 8)
    rows = validation_records(config, num, stage, texts, images)
    tok = tokenizer_lib.load_tokenizer(config.data.tokenizer)
    sampling = dict(cfg=config.train.get("sample_cfg", 3.0), seed=config.seed)
    return rows, tok, sampling, num


def generation_sampler(config, stage) -> Sampler | None:
    """(model, step) -> uint8 grid [H, W, 3] (`metrics.image_grid`): one row of `train.sample_num`
    [S, S, 3] images, one per validation caption; None when `train.sample_every` is 0. Its records are read once, here."""
    setup = _setup(config, stage, ("caption",))
    if setup is None:
        return None
    rows, tok, sampling, num = setup

    def sample(model, step: int) -> np.ndarray:
        runner = runner_lib.StarRunner(model, config, tok)
        drawn, _ = runner.text_to_image([r["caption"] for r in rows], **sampling)
        return metrics.image_grid(drawn, cols=num)

    return sample


def editing_sampler(config, stage) -> Sampler | None:
    """(model, step) -> uint8 grid of three rows (validation sources, their edits, the targets), each
    of `train.sample_num` [S, S, 3] images; None when `train.sample_every` is 0. Its records are read
    once, here."""
    setup = _setup(config, stage, ("instruction",), ("source_image", "target_image"))
    if setup is None:
        return None
    rows, tok, sampling, num = setup

    def sample(model, step: int) -> np.ndarray:
        runner = runner_lib.StarRunner(model, config, tok)
        source = np.stack([r["source_image"] for r in rows])
        edited = runner.edit(source, [r["instruction"] for r in rows], **sampling)
        targets = np.stack([r["target_image"] for r in rows])
        return metrics.image_grid(np.concatenate([source, edited, targets]), cols=num)

    return sample
