"""star_jax.samples: the registry's samplers, validation records, off when train.sample_every is 0.
(Drawing a grid with a trained model: tests/test_pipeline.py.)"""

import numpy as np
import pytest

from star_jax import samples, shapes, stages
from star_jax.configs import star as star_config


def make_config(stage, **data):
    config = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    config.data.num_eval_examples = 6
    for key, value in data.items():
        config.data[key] = value
    return config


def test_the_registry_names_the_samplers():
    assert stages.get("generation").sampler is samples.generation_sampler
    assert stages.get("editing").sampler is samples.editing_sampler
    assert stages.get("understanding").sampler is None and stages.get("vq").sampler is None


EDIT_FIELDS = (("instruction",), ("source_image", "target_image"))


def test_validation_records_are_decoded_at_the_vq_size():
    config = make_config("editing")
    rows = samples.validation_records(config, 3, stages.EDITING, *EDIT_FIELDS)
    assert len(rows) == 3 and sorted(rows[0]) == ["instruction", "source_image", "target_image"]
    size = config.model.vq.image_size
    for i, row in enumerate(rows):
        ex = shapes.make_example("validation", i, "edit", resolution=config.data.vit_image_size)
        assert row["instruction"] == ex["instruction"]
        assert row["source_image"].shape == (size, size, 3) and row["source_image"].dtype == np.uint8
    rows = samples.validation_records(make_config("generation"), 2, stages.GENERATION, ("caption",))
    assert rows == [
        {"caption": shapes.make_example("validation", i, "pair", resolution=32)["caption"]} for i in range(2)
    ]
    with pytest.raises(ValueError, match=r"source='shapes'\) has fewer than 7 usable records"):
        samples.validation_records(config, 7, stages.EDITING, *EDIT_FIELDS)


def test_no_sampler_when_sample_every_is_zero():
    for name in ("generation", "editing"):
        config = make_config(name)
        config.train.sample_every = 0
        assert stages.get(name).sampler(config, stages.get(name)) is None
