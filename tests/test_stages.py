"""star_jax.stages: the registry every other module looks stages up in."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx

from star_jax import checkpointing, objectives, sharding, stages, train
from star_jax.configs import star as star_config
from star_jax.configs import validation


def _abstract_paths(config) -> list[str]:
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.rules_from_config(config)):
        model = nnx.eval_shape(lambda: stages.build_model(config, rngs=nnx.Rngs(0)))
    return list(checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict()))


@pytest.mark.parametrize("name", ["vq", "understanding", "generation", "editing"])
def test_each_stage_builds_its_parts_and_trains_only_them(name):
    config = star_config.get_config(f"size=tiny,stage={name}")
    record = stages.get(name)
    paths = _abstract_paths(config)
    built = {p.split("/")[0] for p in paths}
    assert built == set(record.components) - ({"discriminator"} if not config.vq_loss.disc_weight else set())
    trained = [p for p in paths if any(re.search(r, p) for r in record.trainable)]
    assert trained, f"{name}: its trainable patterns match no param"
    assert tuple(config.train.trainable) == record.trainable and tuple(config.train.init_from) == record.init_from
    if name in ("generation", "editing"):  # the base is frozen in every later stage
        assert not [p for p in trained if p.startswith(("base/", "vision/", "vq/"))]


def test_unknown_stage_names_the_known_ones():
    config = star_config.get_config("size=tiny,stage=generation")
    config.stage = "genration"
    with pytest.raises(validation.ConfigError, match=r"config.stage='genration'.*generation"):
        validation.validate(config)
    with pytest.raises(ValueError, match="known: vq, understanding, generation, editing"):
        stages.get("genration")


def test_a_project_stage_registers_through_config_imports():
    config = star_config.get_config("size=tiny,stage=vision")
    config.imports = ("star_jax.projects.shapes.vision",)
    validation.validate(config)
    record = stages.for_config(config)
    assert record.name == "vision" and "vision" in stages.names()
    paths = _abstract_paths(config)
    assert {p.split("/")[0] for p in paths} == {"vision", "word_head"}  # the project's head, built by the core


def test_tokens_and_flops_per_example_follow_the_record():
    config = star_config.get_config("size=tiny,stage=generation")
    n = stages.num_image_tokens(config)
    assert stages.GENERATION.tokens_per_example(config) == config.data.max_prompt_len + n
    assert stages.UNDERSTANDING.tokens_per_example(config) == config.data.max_prompt_len
    assert stages.VQ.tokens_per_example(config) == 1
    assert stages.GENERATION.flops_per_example(config) > stages.UNDERSTANDING.flops_per_example(config) > 0


def test_registering_a_stage_is_all_a_new_stage_needs(tmp_path, monkeypatch):
    """A new stage (here: understanding that trains only the decoder's final norm) is one record;
    the trainer, the input pipeline and checkpointing serve it unchanged."""

    def norm_only_objective(config, vit_layout):
        return lambda m, b, r, s: objectives.understanding_loss(m, b, r, s, vit_layout=vit_layout)

    monkeypatch.setattr(stages, "_REGISTRY", dict(stages._REGISTRY))  # the test's stage leaves with it
    record = stages.register(
        dataclasses.replace(
            stages.UNDERSTANDING,
            name="test_norm_only",
            trainable=(r"^base/stack/final_norm/",),
            objective=norm_only_objective,
        )
    )
    config = star_config.get_config("size=tiny,stage=test_norm_only,runlocal")
    config.train.trainable = record.trainable
    config.train.num_steps, config.train.batch_size, config.train.log_every = 2, 8, 1
    out = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(out["loss"]) and "text_accuracy" in out
    with pytest.raises(ValueError, match="already registered"):
        stages.register(dataclasses.replace(record, trainable=()))
    assert jax.device_count() == 8
