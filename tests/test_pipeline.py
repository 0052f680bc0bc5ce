"""The shapes project's staged pipeline end to end on the `tiny` size: vq -> vision ->
understanding -> generation -> editing -> evaluation, and the inference CLIs on its workdir.

Checks the stage plumbing (init from earlier stages, stack copy, frozen components), not quality:
the base's params and its understanding answers are bit-identical before and after the
generation and editing stages, and the report is written.
"""

import json
import os
import re

import numpy as np
import pytest
from flax import nnx

from star_jax import checkpointing, init_sources, samples, sharding, stages
from star_jax.configs import star as star_config
from star_jax.decode.runner import StarRunner
from star_jax.projects.shapes import config as shapes_demo
from star_jax.projects.shapes import pipeline

pytestmark = pytest.mark.slow  # one tiny run of every stage (about 6 minutes on 2 cores) feeds the module


def _tiny_config():
    config = shapes_demo.get_config("vision")  # every stage, the optional vision stage included
    tiny = star_config.get_config("size=tiny,stage=vq")
    config.model = tiny.model
    config.model.decoder.dtype = "float32"
    # Renders are 64 px: the demo's kind of VQ (8 x 8 patches, 1 x 1 convs seeing one neighbour)
    # gives 8 x 8 codes and compiles in half the time of a 3-level conv pyramid.
    config.model.vq.update(image_size=64, patch_size=8, ch_mult=(1,), local_encoder=True, local_context=1)
    config.data.vit_image_size = 56
    config.data.max_prompt_len = 40
    config.pipeline.eval.per_task = 2
    config.pipeline.eval.qa = 8
    config.pipeline.eval.edits = 4
    config.pipeline.eval.update(caption_pairs=16, usage_images=32, locality_edits=8)
    for stage in config.pipeline.stages:
        config.stage_overrides[stage].train.num_steps = 3
        config.stage_overrides[stage].train.batch_size = 8  # one row per simulated device
        config.stage_overrides[stage].train.warmup_steps = 1
    config.stage_overrides.editing.data.max_prompt_len = 140
    # The generation stage draws its sample grid at its last step with the sharded model in
    # training; editing's sampler is the same code (test_sample_grids_of_generation_and_editing).
    config.stage_overrides.generation.train.sample_num = 2
    config.stage_overrides.editing.train.sample_every = 0
    config.stage_overrides.generation.train.lr = 1e-5  # the stack stays within 3 Adam steps of its copy
    config.train.log_every = 1
    config.train.ckpt_every = 2
    return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    config = _tiny_config()
    report = pipeline.run(config, workdir)
    return config, workdir, report


@pytest.fixture(scope="module")
def editing_model(demo):
    config = pipeline.stage_config(demo[0], "editing")
    return sharding.create_sharded(
        lambda: stages.build_model(config, "editing", rngs=nnx.Rngs(0)),
        sharding.single_device_mesh(),
        sharding.DEFAULT_RULES,
    )


def _stage_params(model, workdir, stage, prefix):
    """Params under `prefix` as stage `stage` saved them (loaded into the editing-stage model)."""
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        loaded = init_sources.load_from_stage(model, workdir, stage)
    flat = checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict())
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith(prefix) and k in loaded}


def test_eval_qa_reproduces_the_reports_understanding(demo, capsys, tmp_path):
    from star_jax.cli import eval as eval_cli

    config, workdir, _ = demo
    numbers = json.load(open(os.path.join(workdir, "report.json")))
    out = tmp_path / "qa.json"
    argv = ["star-jax eval", "qa", "--workdir", workdir, "--num", str(config.pipeline.eval.qa), "--results", str(out)]
    assert eval_cli.main(argv) == 0
    result = json.load(open(out))
    assert {k: r["accuracy"] for k, r in result["per_kind"].items()} == numbers["understanding_before"]["per_kind"]
    assert {k: r["control"] for k, r in result["per_kind"].items()} == numbers["understanding_shuffled"]["per_kind"]
    assert sum(r["n"] for r in result["per_kind"].values()) == config.pipeline.eval.qa
    printed = capsys.readouterr().out
    assert "| overall | 8 |" in printed and "| question form | n |" in printed
    assert sum(r["n"] for r in result["per_form"].values()) == config.pipeline.eval.qa
    assert eval_cli.main(["star-jax eval", "qa", "--workdir", str(tmp_path / "none")]) == 2


def test_report_written(demo):
    _, workdir, report = demo
    assert os.path.exists(os.path.join(workdir, "report.md"))
    assert os.path.exists(os.path.join(workdir, "samples.png"))
    stage_samples = [f for f in os.listdir(os.path.join(workdir, "generation")) if f.startswith("samples_")]
    assert stage_samples == ["samples_0000003.png"]  # the last step's (sample_every > num_steps)
    assert not [f for f in os.listdir(os.path.join(workdir, "editing")) if f.startswith("samples_")]
    numbers = json.load(open(os.path.join(workdir, "report.json")))
    assert set(numbers["stage_wall_s"]) >= {"vq", "understanding", "generation", "editing", "evaluation"}
    assert 0.0 <= numbers["generation"]["overall"] <= 1.0
    assert 0.0 <= numbers["generation_before_editing"]["overall"] <= 1.0
    assert 0.0 < numbers["vq_ceiling"]["edit_unchanged_cells"] < 1.0
    assert 0.0 <= numbers["vq_ceiling"]["edit_codes_kept"] <= 1.0
    info = numbers["caption_information"]
    assert set(info) == {"background", "object", "first_object"}
    for v in info.values():
        assert v["cond"] > 0 and v["uncond"] > 0 and v["gain"] == pytest.approx(v["uncond"] - v["cond"])
    text = open(os.path.join(workdir, "report.md")).read()
    assert "before the editing stage" in text and "keep their code" in text and "What the caption is worth" in text
    assert set(numbers["controls"]) == {"untrained_stack", "random_codes", "fragments"}
    for name, summary in numbers["controls"].items():  # the scorer passes none of them
        assert summary["overall"] <= 0.05 and summary["images"] == 12, name
    assert "Controls (ShapeEval overall on the same prompts; each must be <= 0.05, passes)" in text


def test_vq_only_pipeline_reports_the_tokenizer(tmp_path):
    config = _tiny_config()
    config.pipeline.stages = ("vq",)
    report = pipeline.run(config, str(tmp_path))
    numbers = json.load(open(tmp_path / "report.json"))
    assert set(numbers) == {"vq_ceiling", "controls", "stage_wall_s", "total_wall_s", "base_trained_in"}
    assert set(numbers["controls"]) == {"random_codes", "fragments"}
    assert (
        numbers["vq_ceiling"]["psnr"] == pytest.approx(report["vq_ceiling"]["psnr"])
        and report["vq_ceiling"]["psnr"] > 5
    )
    assert "VQ ceiling" in (tmp_path / "report.md").read_text() and not (tmp_path / "samples.png").exists()


def test_base_only_pipeline_reports_qa_against_its_control(tmp_path):
    """vision -> understanding only (the project config's `base` stages), with Qwen3-VL's interleaved
    M-RoPE and the vision stage on scene cells with centres."""
    config = _tiny_config()
    config.pipeline.stages = ("vision", "understanding")
    config.model.decoder.mrope_interleaved = True
    config.data.vision_labels = "scene_cells"
    config.data.scene_centres = True
    report = pipeline.run(config, str(tmp_path))
    numbers = json.load(open(tmp_path / "report.json"))
    assert set(numbers) == {
        "understanding_before",
        "understanding_shuffled",
        "stage_wall_s",
        "total_wall_s",
        "base_trained_in",
    }
    assert numbers["understanding_before"]["overall"] == pytest.approx(report["understanding_before"]["overall"])
    text = (tmp_path / "report.md").read_text()
    assert "| question | after understanding stage | control: another scene's image |" in text
    assert "VQ ceiling" not in text and not (tmp_path / "vq").exists()
    ckpts = checkpointing.StageCheckpoints(str(tmp_path), "vision", read_only=True)
    saved = checkpointing.flatten(ckpts.read_state(ckpts.latest_step())["params"])
    ckpts.close()
    assert any(k.startswith("cell_head/") for k in saved) and not any(k.startswith("word_head/") for k in saved)
    log = [json.loads(line) for line in open(tmp_path / "vision" / "metrics.jsonl")]
    assert all(0.0 <= row["cell_shape_accuracy"] <= 1.0 for row in log if "cell_shape_accuracy" in row)
    assert any("cell_shape_accuracy" in row for row in log)
    assert saved["cell_head/kernel"].shape[-1] == 5 + 10 + 4  # shapes, colours (+ none each), centre
    assert any("cell_centre_error" in row for row in log)
    # The runner answers with the layout the base was trained on (the stage's saved config).
    runner = StarRunner(*init_sources.load_workdir(str(tmp_path), ("understanding",))[:2])
    prompts, encode = [], runner.tok.encode
    runner.tok.encode = lambda text: prompts.append(text) or encode(text)
    runner.understand(np.zeros((1, 32, 32, 3), np.uint8), ["how many circles are there?"], max_new_tokens=2)
    assert prompts[0].index("<|vision_start|>") < prompts[0].index("how many circles are there?")


def test_joint_ablation_report_names_the_stages_that_train_the_base(tmp_path):
    """STAR's configs freeze the base after understanding; `joint` trains it in generation and
    editing, and its report says so beside the understanding columns."""
    assert pipeline.stages_training_the_base(shapes_demo.get_config()) == ()
    assert pipeline.stages_training_the_base(shapes_demo.get_config("joint")) == ("generation", "editing")
    qa = lambda answers: {  # noqa: E731
        "per_kind": {"color": sum(a == p for _, a, p in answers) / len(answers)},
        "overall": sum(a == p for _, a, p in answers) / len(answers),
        "answers": answers,
    }
    before = [("what color is the circle?", "red", "red"), ("what color is the square?", "blue", "blue")]
    after = [(q, a, "zero yes yes") for q, a, _ in before]
    r = {"understanding_before": qa(before), "understanding_after": qa(after)}
    r |= {"understanding_shuffled": qa(after), "stage_wall_s": {}, "total_wall_s": 0.0}
    pipeline.write_report(str(tmp_path), r | {"base_trained_in": ("generation", "editing")})
    text = (tmp_path / "report.md").read_text()
    assert "| color | 1.000 | 0.000 | 0.000 |" in text
    assert (
        "after all stages, base trained (ablation)" in text
        and "bit-identical before and after the generation and editing stages: **False**" in text
    )
    assert "trains the base in the generation and editing stage(s)" in text
    assert json.load(open(tmp_path / "report.json"))["base_trained_in"] == ["generation", "editing"]
    pipeline.write_report(str(tmp_path), r)
    assert "ablation" not in (tmp_path / "report.md").read_text()


def test_sample_grids_of_generation_and_editing(demo):
    """The trainer's samplers draw with the trained model: one row of generated images, and
    sources / edits / targets of the first validation edits."""
    config, workdir, _ = demo
    model = init_sources.load_workdir(workdir, ("editing", "generation"))[0]
    for stage, rows in (("generation", 1), ("editing", 3)):
        c = pipeline.stage_config(config, stage)
        c.train.sample_every, c.train.sample_num = 5, 2
        record = stages.get(stage)
        grid = record.sampler(c, record)(model, 5)
        size = c.model.vq.image_size
        assert grid.shape == (rows * (size + 2) + 2, 2 * (size + 2) + 2, 3) and grid.dtype == np.uint8
        if stage == "editing":
            records = samples.validation_records(c, 2, record, ("instruction",), ("source_image", "target_image"))
            step = size + 2
            for i, r in enumerate(records):
                column = grid[:, 2 + i * step : 2 + i * step + size]
                assert np.array_equal(column[2 : 2 + size], r["source_image"])
                assert np.array_equal(column[2 + 2 * step : 2 + 2 * step + size], r["target_image"])
        c.train.sample_every = 0
        assert record.sampler(c, record) is None


def test_frozen_base_is_bit_identical_after_later_stages(demo, editing_model):
    _, workdir, report = demo
    for prefix in ("base/", "vision/", "vq/"):
        source = {"base/": "understanding", "vision/": "understanding", "vq/": "vq"}[prefix]
        before = _stage_params(editing_model, workdir, source, prefix)
        after = _stage_params(editing_model, workdir, "editing", prefix)
        assert before and before.keys() == after.keys()
        for k in before:
            assert np.array_equal(before[k], after[k]), k
    assert report["understanding_unchanged"]


def test_understanding_starts_from_the_vision_stages_tower(demo):
    config, workdir, _ = demo
    assert "vision" in config.pipeline.stages
    assert tuple(config.stage_overrides.understanding.train.init_from) == ("vision",)
    understanding = pipeline.stage_config(config, "understanding")
    fresh = lambda: sharding.create_sharded(  # noqa: E731
        lambda: stages.build_model(understanding, rngs=nnx.Rngs(0)),
        sharding.single_device_mesh(),
        sharding.DEFAULT_RULES,
    )
    model, untouched = fresh(), fresh()
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        init_sources.initialise(model, understanding, workdir)
    got, init = ({k: np.asarray(v) for k, v in init_sources.param_targets(m).items()} for m in (model, untouched))
    ckpts = checkpointing.StageCheckpoints(workdir, "vision", read_only=True)
    saved = checkpointing.flatten(ckpts.read_state(ckpts.latest_step())["params"])
    ckpts.close()
    assert any(k.startswith("word_head/") for k in saved) and not any(k.startswith("word_head/") for k in got)
    tower = [k for k in got if k.startswith("vision/")]
    assert tower and all(np.array_equal(got[k], np.asarray(saved[k])) for k in tower)
    assert any(not np.array_equal(got[k], init[k]) for k in tower)  # the vision stage moved them
    assert all(np.array_equal(got[k], init[k]) for k in got if k.startswith("base/"))  # the base starts fresh
    # The same tower from another run's stage directory ('stage:<dir>'), from any workdir.
    other = fresh()
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        loaded = init_sources.load_source(other, "/nonexistent", f"stage:{workdir}/vision/")
    assert loaded == set(tower)
    assert all(
        np.array_equal(np.asarray(v), got[k]) for k, v in init_sources.param_targets(other).items() if k in loaded
    )


def test_stack_started_as_a_copy_of_the_last_base_layers(demo, editing_model):
    config, workdir, _ = demo
    # Each Adam step moves a param by about lr at most, so 3 steps at lr 1e-5 stay well within 1e-4.
    base = _stage_params(editing_model, workdir, "understanding", "base/stack/layers/")
    n = config.model.star.stack_layers
    gen = _stage_params(editing_model, workdir, "generation", "stacked_ar/layers/")
    assert gen and max(np.abs(v).max() for v in gen.values()) > 1e-2  # real weights: equality is not vacuous
    for k, v in gen.items():
        b = base["base/stack/layers/" + k[len("stacked_ar/layers/") :]][-n:]
        assert v.shape == b.shape
        np.testing.assert_allclose(v, b, atol=1e-4, rtol=0, err_msg=k)


# -- the inference CLIs on the demo's workdir: outputs, determinism, bad input ----------------


def _png_bytes(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)) if n[0].isdigit()}


def test_generate_cli_is_deterministic_and_refuses_a_prompt_that_does_not_fit(demo, tmp_path, capsys):
    from star_jax.cli import generate

    _, workdir, _ = demo
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a photo of a red circle\n")
    bad.write_text("a photo of a red circle\n" + "a photo of " + "blue square and " * 40 + "a cat\n")
    flags = ["--num", "2", "--top_k", "5", "--seed", "3", "--workdir", workdir]
    assert generate.main(["generate", *flags, "--prompts", str(good), "--out", str(tmp_path / "a")]) == 0
    assert generate.main(["generate", *flags, "--prompts", str(good), "--out", str(tmp_path / "b")]) == 0
    a, b = _png_bytes(tmp_path / "a"), _png_bytes(tmp_path / "b")
    assert list(a) == ["00000_0.png", "00000_1.png"] and a == b  # same seed, same images
    assert os.path.exists(tmp_path / "a" / "grid.png")
    capsys.readouterr()
    # A prompt that does not fit is refused before the model loads, naming its line; nothing written.
    assert generate.main(["generate", *flags, "--prompts", str(bad), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--prompts line 2" in err and "config.data.max_prompt_len" in err
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "red " * 200], "config.data.max_prompt_len"),
    ],
)
def test_generate_cli_bad_prompts(demo, tmp_path, capsys, argv, message):
    """Refused before the model loads: exit 2, one line, nothing written."""
    from star_jax.cli import generate

    out = tmp_path / "out"
    assert generate.main(["generate", "--workdir", demo[1], *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_unknown_workdir_and_bad_images(demo, tmp_path, capsys):
    from star_jax.cli import edit, generate, understand

    missing = str(tmp_path / "nope")
    assert generate.main(["generate", "--workdir", missing, "--prompt", "a red circle", "--out", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for path, message in ((str(tmp_path / "absent.png"), "does not exist"), (str(corrupt), "not an image")):
        assert edit.main(["edit", "--workdir", demo[1], "--image", path, "--instruction", "x", "--out", missing]) == 2
        err = capsys.readouterr().err
        assert path in err and message in err
        assert understand.main(["understand", "--workdir", demo[1], "--image", path, "--question", "how many?"]) == 2
        assert message in capsys.readouterr().err


def test_edit_and_understand_cli(demo, tmp_path, capsys):
    from PIL import Image

    from star_jax import shapes
    from star_jax.cli import edit, understand

    _, workdir, _ = demo
    paths = []
    for i in range(2):
        scene = shapes.sample_scene(np.random.default_rng(i))
        paths += ["--image", str(tmp_path / f"{i}.png")]
        Image.fromarray(shapes.render(scene, 64)).save(tmp_path / f"{i}.png")
    out = tmp_path / "edits"
    argv = ["edit", "--workdir", workdir, *paths, "--instruction", "make the circle red", "--out", str(out)]
    assert edit.main(argv) == 0
    assert sorted(os.listdir(out)) == ["edit_000.png", "edit_001.png"]
    argv = ["understand", "--workdir", workdir, "--image", paths[1], "--question", "how many circles are there?"]
    assert understand.main(argv) == 0
    assert capsys.readouterr().out.strip()  # the tiny model's answer, whatever it is


def test_vq_cli_reads_the_runs_trained_vq(demo, editing_model, tmp_path, capsys):
    from PIL import Image

    from star_jax import init_sources
    from star_jax.cli import vq as vq_cli

    _, workdir, _ = demo
    model = init_sources.load_workdir(workdir, vq_cli.VQ_STAGES)[0].vq
    trained = _stage_params(editing_model, workdir, "vq", "vq/")
    ours = checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict())
    assert trained and all(np.array_equal(ours[k[len("vq/") :]], v) for k, v in trained.items())

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(images / "grey.png")
    codes, out = str(tmp_path / "codes.arrayrecord"), str(tmp_path / "decoded")
    assert vq_cli.main(["star-jax vq", "encode", "--images", str(images), "--out", codes, "--workdir", workdir]) == 0
    assert vq_cli.main(["star-jax vq", "decode", "--codes", codes, "--out", out, "--workdir", workdir]) == 0
    assert os.path.exists(os.path.join(out, "grey.png"))
    argv = ["star-jax vq", "ceiling", "--workdir", workdir, "--per_task", "1", "--usage_images", "64"]
    assert vq_cli.main(argv) == 0
    assert re.search(
        r"VQ ceiling: ShapeEval overall [01]\.\d{3}, PSNR \d+\.\d\d dB .* usage 0\.\d{3}", capsys.readouterr().out
    )
    assert vq_cli.main(["star-jax vq", "encode", "--images", str(images), "--out", codes, "--workdir", out]) == 2
    assert "has no trained" in capsys.readouterr().err
