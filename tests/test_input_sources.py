"""star_jax.input.sources: the shapes world's records, render sizes from the stage record, the source
registry and its errors."""

import json

import numpy as np
import pytest

from star_jax import records, shapes, stages
from star_jax.configs import star as star_config
from star_jax.input import sources


def make_config(stage="generation", **data):
    config = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    for key, value in data.items():
        config.data[key] = value
    return config


def test_shapes_source_yields_the_worlds_examples_of_each_kind():
    pairs = sources.ShapesSource("validation", "pairs", 5, resolution=32, seed=2)
    qa = sources.ShapesSource("validation", "qa", 5, resolution=32, seed=2)
    edits = sources.ShapesSource("validation", "edits", 5, resolution=48, seed=2)
    assert len(pairs) == 5
    for i in range(3):
        ex = shapes.make_example("validation", i, "pair", seed=2, resolution=32)
        record = pairs[i]
        assert sorted(record) == ["caption", "image", "metadata", "objects"]
        np.testing.assert_array_equal(record["image"], ex["image"])
        assert record["caption"] == ex["caption"] and json.loads(record["metadata"]) == json.loads(
            records.json_dumps(ex["metadata"])
        )
        objects = records.decode_objects(record["objects"])
        assert objects == [(o.shape, o.color, o.x, o.y, o.size) for o in ex["scene"].objects]
        ex = shapes.make_example("validation", i, "qa", seed=2, resolution=32)
        assert qa[i]["question"] == ex["question"] and qa[i]["answer"] == ex["answer"] and len(qa[i]) == 3
        ex = shapes.make_example("validation", i, "edit", seed=2, resolution=48)
        assert edits[i]["instruction"] == ex["instruction"] and edits[i]["target_image"].shape == (48, 48, 3)
    with pytest.raises(ValueError, match="record kind 'boxes' is unknown"):
        sources.ShapesSource("train", "boxes", 5, resolution=32)


def test_render_size_is_the_largest_input_the_stage_reads():
    config = make_config(vit_image_size=56)  # tiny VQ: 32 px
    size = {name: sources.render_size(config, stages.get(name)) for name in ("vq", "generation")}
    assert size == {"vq": 32, "generation": 32}
    assert sources.render_size(config, stages.get("understanding")) == 56
    assert sources.render_size(config, stages.get("editing")) == 56  # max(VQ, ViT)
    config.model.vq.image_size = 64
    assert sources.render_size(config, stages.get("editing")) == 64
    source, parser = sources.make_source(config, "validation", stages.get("editing"))
    assert parser is None and source.resolution == 64 and source.kind == "edits"
    assert len(source) == config.data.num_eval_examples
    assert len(sources.make_source(config, "train", stages.get("editing"))[0]) == config.data.num_train_examples


def test_unknown_source_fails_naming_it_and_the_known_ones():
    config = make_config(source="nowhere")
    with pytest.raises(
        ValueError, match=r"config.data.source='nowhere' is not a data source; known: shapes, arrayrecord"
    ):
        sources.make_source(config, "train", stages.get("generation"))


def test_source_errors_name_the_config_key():
    with pytest.raises(ValueError, match="config.data.pretokenized=True needs source='arrayrecord'"):
        sources.make_source(make_config(pretokenized=True), "train", stages.get("generation"))
    with pytest.raises(ValueError, match="config.data.source='arrayrecord' needs config.data.path"):
        sources.make_source(make_config(source="arrayrecord"), "train", stages.get("generation"))


def _test_source(config, split, stage, render_size):
    return [{"split": split, "size": render_size, "reads": stage.reads}], None


def _other_source(config, split, stage, render_size):
    return [], None


def test_a_registered_source_is_made_by_name():
    sources.register_source("test_registry", _test_source)
    sources.register_source("test_registry", _test_source)  # the same factory again: a no-op
    assert "test_registry" in sources.source_names()
    source, parser = sources.make_source(make_config(source="test_registry"), "validation", stages.get("understanding"))
    assert parser is None and source[0] == {"split": "validation", "size": 56, "reads": "qa"}
    with pytest.raises(ValueError, match="data source 'test_registry' is already registered"):
        sources.register_source("test_registry", _other_source)
    with pytest.raises(ValueError, match="data source 'shapes' is already registered"):
        sources.register_source("shapes", _other_source)
