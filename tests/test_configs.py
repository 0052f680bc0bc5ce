"""Configs: parsing, overrides, the size table, and every validation error naming key and value."""

import math
import os

import jax
import ml_collections
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from star_jax import layers, sequences, sharding, stages, sweep
from star_jax.cli import common as cli_common
from star_jax.configs import common, sizes, star, validation
from star_jax.input import examples
from star_jax.models import qwen2, vision_preprocess
from star_jax.projects.shapes import config as shapes_demo
from star_jax.projects.shapes import pipeline
from star_jax.text.tokenizer import BuiltinTokenizer


def test_parse_arg():
    arg = common.parse_arg("size=shapes,stage=editing,runlocal", size="tiny", stage="generation", runlocal=False)
    assert (arg.size, arg.stage, arg.runlocal) == ("shapes", "editing", True)
    assert common.parse_arg("3b", size="tiny").size == "3b"
    with pytest.raises(ValueError, match="'colour' is unknown"):
        common.parse_arg("colour=red", size="tiny")
    with pytest.raises(ValueError, match="runlocal='maybe'"):
        common.parse_arg("runlocal=maybe", runlocal=False)


def test_config_file_and_dotted_overrides():
    argv = [
        "prog",
        "--config=configs/star.py:size=tiny,stage=generation,runlocal=True",
        "--config.train.lr=0.5",
        "--config.mesh.ici=(2,2,2)",
    ]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    config = fv.config
    assert (config.size, config.stage, config.train.lr, tuple(config.mesh.ici)) == (
        "tiny",
        "generation",
        0.5,
        (2, 2, 2),
    )
    assert config.train.batch_size == 8  # runlocal shrinks


def test_init_sources_and_trainable_set_are_overridable_on_the_command_line():
    argv = [
        "prog",
        "--config=configs/star.py:size=tiny,stage=understanding",
        "--config.train.init_from=('vision', 'hf:/models/qwen')",
        "--config.train.trainable=('^base/stack/',)",
    ]
    config = cli_common.parse(argv).config
    assert config.train.init_from == ("vision", "hf:/models/qwen")
    assert config.train.trainable == ("^base/stack/",)
    validation.validate(config, num_devices=8)


def _valid():
    return star.get_config("size=tiny,stage=generation,runlocal")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model.decoder.num_heads", 3, r"config.model.decoder.num_heads=3: hidden_size 64 is not divisible"),
        ("model.decoder.num_kv_heads", 3, r"config.model.decoder.num_kv_heads=3: does not divide num_heads 4"),
        (
            "model.decoder.mrope_section",
            (2, 3, 4),
            r"config.model.decoder.mrope_section=\(2, 3, 4\): must be 3 sections",
        ),
        ("model.decoder.hidden_size", -64, r"config.model.decoder.hidden_size=-64: must be positive"),
        ("model.decoder.num_layers", 0, r"config.model.decoder.num_layers=0: must be positive"),
        ("model.decoder.dtype", "float8", r"config.model.decoder.dtype='float8'"),
        ("model.vision.num_heads", 5, r"config.model.vision.num_heads=5"),
        ("model.vision.window_size", 50, r"config.model.vision.window_size=50"),
        ("model.vq.image_size", 33, r"config.model.vq.image_size=33"),
        ("model.vq.codebook_size", 0, r"config.model.vq.codebook_size=0: must be positive"),
        ("model.vq.patch_size", 0, r"config.model.vq.patch_size=0: must be positive"),
        ("model.vq.patch_size", 3, r"config.model.vq.image_size=32: must be divisible by the downsampling factor 12"),
        ("model.star.stack_layers", 9, r"config.model.star.stack_layers=9: cannot copy more layers"),
        ("stage", "pretraining", r"config.stage='pretraining': unknown stage"),
        ("stage", "genration", r"config.stage='genration': unknown stage \(did you mean 'generation'\?\)"),
        (
            "data.max_prompt_len",
            20,
            r"config.data.max_prompt_len=20: a prompt of stage 'generation' needs at least 21 tokens",
        ),
        ("size", "huge", r"config.size='huge': unknown size"),
        ("train.batch_size", 0, r"config.train.batch_size=0: must be positive"),
        ("train.sample_every", -1, r"config.train.sample_every=-1: must be >= 0"),
        (
            "train.lr_mults",
            (("^vision/", 0.0),),
            r"config.train.lr_mults=\('\^vision/', 0.0\): the factor must be a positive number",
        ),
        ("train.lr_mults", (("^vision/(", 2.0),), r"config.train.lr_mults='\^vision/\(': not a regular expression"),
        (
            "train.lr_mults",
            ("^vision/",),
            r"config.train.lr_mults='\^vision/': each entry must be a \(regex, factor\) pair",
        ),
        ("mesh.ici", (2, 2, 1), r"config.mesh: ici \(2, 2, 1\) x dcn \(1, 1, 1\) = 4 devices, but there are 8"),
        ("mesh.ici", (0, 2, 1), r"config.mesh.ici=\(0, 2, 1\): axis 'data' has size 0"),
    ],
)
def test_validation_errors_name_key_and_value(key, value, match):
    config = _valid()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(validation.ConfigError, match=match):
        validation.validate(config, num_devices=8)


def test_unknown_size_in_get_config():
    with pytest.raises(ValueError, match="size='huge' is unknown"):
        star.get_config("size=huge")


def test_every_size_and_stage_is_valid():
    validation.validate_sizes_table()
    ladder_sizes = [s for s in sizes.SIZES if s.startswith("ladder_")]
    assert len(ladder_sizes) >= 5
    for size in sizes.SIZES:
        for stage in stages.names():
            validation.validate(star.get_config(f"size={size},stage={stage}"), num_devices=8)


# A reasoning rewrite as long as the reference lets the base answer (256 tokens) + its style suffix; an
# edit instruction and a question + answer of about 100 tokens each.
REWRITE = "red " * 256 + " Ultra HD, 4K, cinematic composition"
INSTRUCTION = "make the red circle blue and move it " * 12
QUESTION, ANSWER = "how many red circles are left of the blue square " * 10, "two red circles " * 30
STAR_STAGES = ("vq", "understanding", "generation", "editing")  # other tests register project stages


@pytest.mark.parametrize("size", list(sizes.SIZES))
def test_default_prompt_length_fits_every_stage_at_every_size(size):
    """The default `data.max_prompt_len` of each stage holds its example: an edit (VQ block of the
    size's grid + ViT block + instruction), a reasoning rewrite, a question with its answer."""
    tok = BuiltinTokenizer()
    for name in STAR_STAGES:
        config, stage = star.get_config(f"size={size},stage={name}"), stages.get(name)
        validation.validate(config)
        length, n = config.data.max_prompt_len, stages.num_image_tokens(config)
        merge = config.model.vision.spatial_merge_size
        if stage.reads == "edits":
            # The largest ViT block at inference: a square source at the edit pixel budget.
            unit = config.model.vision.patch_size * merge
            side = math.isqrt(vision_preprocess.pixel_bounds(config.data, editing=True)[1]) // unit * unit
            grid = (1, side // config.model.vision.patch_size, side // config.model.vision.patch_size)
            for vit_grid in (examples.vit_grid(config), grid):
                sequences.editing_example(
                    tok,
                    INSTRUCTION,
                    max_prompt_len=length,
                    num_vq_tokens=n,
                    vit_grid_thw=vit_grid,
                    spatial_merge_size=merge,
                )
        elif stage.reads == "qa":
            grid = examples.vit_grid(config)
            sequences.understanding_example(
                tok, QUESTION, ANSWER, max_prompt_len=length, vit_grid_thw=grid, spatial_merge_size=merge
            )
        elif stage.image_tokens:
            sequences.generation_example(tok, REWRITE, max_prompt_len=length, num_image_tokens=n)
            assert len(tok.encode(REWRITE)) > 256
        if common.has_prompt(stage):
            assert length % common.PROMPT_LEN_MULTIPLE == 0
            assert length < common.prompt_len_needed(config, stage, common.TEXT_BUDGET[stage.reads]) + 64


def test_prompt_length_defaults_at_the_reference_sizes():
    got = {name: star.get_config(f"size=3b,stage={name}").data.max_prompt_len for name in STAR_STAGES}
    # 3b: 576 VQ codes; understanding trains on 256 ViT tokens of 448 px (its inference block comes on
    # top); an edit's source at the reference's 28 * 28 * 576 pixels: 576 ViT tokens; a 128-token
    # instruction / 256-token rewrite + suffix / QA.
    assert got == {"vq": 64, "understanding": 576, "generation": 320, "editing": 1344}
    config = star.get_config("size=3b,stage=editing")
    config.data.max_prompt_len = 1000
    with pytest.raises(
        validation.ConfigError, match=r"max_prompt_len=1000: a prompt of stage 'editing' needs at least 1178"
    ):
        validation.validate(config)
    for key, value, why in (
        ("vit_max_pixels", -1, "must be an integer >= 0"),
        ("vit_edit_max_pixels", 100, "below data.vit_min_pixels"),
    ):
        config = star.get_config("size=3b,stage=editing")
        config.data[key] = value
        with pytest.raises(validation.ConfigError, match=f"config.data.{key}={value}: {why}"):
            validation.validate(config)


def test_the_shapes_demo_keeps_its_own_prompt_lengths():
    """The demo sets max_prompt_len per stage itself: the per-size defaults do not change its batches."""
    config = shapes_demo.get_config("")
    got = {name: pipeline.stage_config(config, name).data.max_prompt_len for name in config.pipeline.stages}
    assert got == {"vq": 48, "understanding": 64, "generation": 48, "editing": 128}


@pytest.mark.parametrize("variant", ["", "quality", "joint", "vision", "base", "base,und_steps=2400"])
def test_every_shapes_demo_stage_is_valid(variant):
    config = shapes_demo.get_config(variant)
    for stage in config.pipeline.stages:
        validation.validate(pipeline.stage_config(config, stage), num_devices=8)
    if "base" in variant:
        assert config.pipeline.stages == ("vision", "understanding")
        assert pipeline.stage_config(config, "understanding").train.init_from == ("vision",)


@pytest.mark.parametrize("name", ["ladder", "stack_depth", "cpu_ladder"])
def test_every_sweep_file_expands_to_valid_configs(name, tmp_path):
    """Each configs/sweeps file expands through the sweep runner: every override key exists, every
    config validates, run names are unique."""
    path = os.path.join(os.path.dirname(star.__file__), "sweeps", f"{name}.py")
    shared, runs, _ = sweep.expand(path, str(tmp_path))
    assert len(runs) >= 4
    assert len({r.name for r in runs}) == len(runs)


def _count(make):
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        state = nnx.state(nnx.eval_shape(make), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "size,stack,head,layer",
    [("3b", 1.233e9, 134e6, 77.1e6), ("7b", 3.263e9, 235e6, 233.1e6)],
)
def test_reference_sizes_by_abstract_init(size, stack, head, layer):
    s = sizes.get_size(size)
    cfg = qwen2.DecoderConfig.from_dict(s["decoder"])
    n_stack = _count(lambda: qwen2.LayerStack(cfg, s["star"]["stack_layers"], rngs=nnx.Rngs(0)))
    n_layer = _count(lambda: qwen2.LayerStack(cfg, 1, rngs=nnx.Rngs(0))) - cfg.hidden_size  # minus final norm
    n_head = _count(
        lambda: layers.Dense(
            cfg.hidden_size, s["vq"]["codebook_size"], ("embed", "vocab"), use_bias=True, rngs=nnx.Rngs(0)
        )
    )
    assert abs(n_stack / stack - 1) < 0.005, n_stack
    assert abs(n_head / head - 1) < 0.005, n_head
    assert abs(n_layer / layer - 1) < 0.005, n_layer


def test_config_is_json_serialisable():
    config = _valid()
    assert ml_collections.ConfigDict(config.to_dict()).to_json()


@pytest.mark.parametrize(
    "command",
    [
        "train",
        "import",
        "export",
        "generate",
        "edit",
        "understand",
        "params",
        "vq encode",
        "vq ceiling",
        "eval shapes",
        "eval qa",
        "bench decoder",
        "bench vision",
    ],
)
def test_cli_help_and_unknown_flags_exit_cleanly(command, capsys):
    """Every command parses absl flags alike: --help prints the usage and flags (exit 0); an
    unknown flag is one line naming it (exit 2)."""
    from star_jax import main

    argv = ["star-jax", *command.split()]
    with pytest.raises(SystemExit) as e:
        main.run(argv + ["--help"])
    assert e.value.code == 0
    assert f"usage: star-jax {command} [flags]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main.run(argv + ["--no_such_flag=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_flag" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_subcommands_missing_and_malformed_flags(capsys):
    """An unknown (sub)command, a missing required flag, a malformed value and a stray argument
    each exit 2 with one line naming it; a command list with no subcommand is printed."""
    from star_jax import main

    for argv, named in (
        (["star-jax", "nonsense"], "nonsense"),
        (["star-jax", "vq", "tokenize"], "tokenize"),
        (["star-jax", "eval", "tower"], "tower"),
        (["star-jax", "generate", "--out", "o", "--prompt", "p"], "--workdir"),
        (["star-jax", "generate", "--workdir", "w", "--out", "o"], "prompt"),
        (["star-jax", "params", "--sizes"], "sizes"),
        (["star-jax", "eval", "qa", "--workdir", "w", "--num", "many"], "num"),
        (["star-jax", "eval", "qa", "--workdir", "w", "stray"], "stray"),
        (["star-jax", "bench", "decoder", "--dtype", "float8"], "dtype"),
    ):
        with pytest.raises(SystemExit) as e:
            main.run(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert main.run(["star-jax", "vq"]) == 2
    assert "encode" in capsys.readouterr().out
    assert main.run(["star-jax", "--help"]) == 0
    assert "understand" in capsys.readouterr().out


def test_reference_sizes_list_full_attention_blocks_as_published():
    """Qwen2.5-VL-3B / 7B's config.json: fullatt_block_indexes [7, 15, 23, 31], in that order."""
    for size in ("3b", "7b"):
        assert tuple(sizes.get_size(size)["vision"]["fullatt_block_indexes"]) == (7, 15, 23, 31)


def test_caption_dropout_zero_is_valid_and_out_of_range_is_named():
    config = _valid()
    config.model.star.caption_dropout = 0.0  # no unconditional rows: a run without CFG
    validation.validate(config)
    config.model.star.caption_dropout = 1.0
    with pytest.raises(validation.ConfigError, match=r"config.model.star.caption_dropout=1.0"):
        validation.validate(config)
