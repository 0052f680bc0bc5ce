"""Every user mistake is one line on stderr naming the setting, exit 2, before any model loads, and
nothing is written; the console stays quiet (library noise goes to the log file only). Fast: no model
is built in this module."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from star_jax import init_sources, main, records, sequences
from star_jax.cli import common
from star_jax.configs import star as star_config
from star_jax.convert import hf_config
from star_jax.input import bad_records
from star_jax.text.tokenizer import BuiltinTokenizer


def run(argv, capsys):
    """(exit status, stderr) of `star-jax *argv` run in this process."""
    capsys.readouterr()
    try:
        code = main.run(["star-jax", *argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def assert_one_line(code, err, *named):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


def write_hf_dir(path, **text_changes):
    """A Hugging Face Qwen2.5-VL directory (config.json only) of the tiny size, with `text_changes`."""
    config = star_config.get_config("size=tiny,stage=understanding")
    hf = hf_config.hf_config(config, with_vision=True, dtype="float32")
    hf["text_config"].update(text_changes)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(path)


# -- train: the config, its overrides, its init sources -----------------------------------------------


@pytest.mark.parametrize(
    "args,named",
    [
        (["--config=configs/star.py:stage=genration"], ["config.stage='genration'", "did you mean 'generation'"]),
        (
            ["--config=configs/star.py:stage=understanding", "--config.train.num_stpes=3"],
            ["--config.train.num_stpes", "did you mean --config.train.num_steps"],
        ),
        (["--config=configs/star.py", "--config.trian.lr=0.1"], ["--config.trian.lr", "--config.train.lr"]),
        (["--config=configs/nope.py"], ["--config file 'configs/nope.py' does not exist", "configs/star.py"]),
        (["--config=configs/star.py:sise=tiny"], ["config argument 'sise' is unknown"]),
        (["--config=configs/star.py:size=huge"], ["size='huge' is unknown"]),
        (["--config=configs/star.py", "--config.train.num_steps=many"], ["--config.train.num_steps=many"]),
        (
            ["--config=configs/star.py:stage=editing", "--config.data.max_prompt_len=64"],
            ["config.data.max_prompt_len=64", "needs at least 94 tokens"],
        ),
        (
            ["--config=configs/star.py:stage=understanding", "--config.data.vit_image_size=50"],
            ["config.data.vit_image_size=50", "multiple of"],
        ),
        (
            ["--config=configs/star.py:stage=understanding", "--config.train.init_from=('hf:/no/such/qwen',)"],
            ["config.train.init_from='hf:/no/such/qwen'", "no such directory"],
        ),
        (
            ["--config=configs/star.py:stage=generation", "--config.train.init_from=('vq:/no/vq.pt',)"],
            ["config.train.init_from='vq:/no/vq.pt'", "no such file"],
        ),
        (
            ["--config=configs/star.py:stage=generation", "--config.train.init_from=('star:/no/star.pt',)"],
            ["config.train.init_from='star:/no/star.pt'", "no such file"],
        ),
        (
            ["--config=configs/star.py:stage=editing", "--config.train.init_from=('stage:/no/run/generation',)"],
            ["config.train.init_from='stage:/no/run/generation'", "holds no complete checkpoint"],
        ),
        (
            ["--config=configs/star.py:stage=editing", "--config.train.init_from=('generaton',)"],
            ["config.train.init_from='generaton'", "not a stage"],
        ),
        (
            ["--config=configs/star.py:stage=understanding", "--config.train.init_from=5"],
            ["config.train.init_from=(5,)", "tuple of strings"],
        ),
        (["--config=configs/star.py", "--config.mesh.ici=(3,1,1)"], ["config.mesh", "3 devices"]),
        # The default init_from of generation names earlier stages that this workdir does not hold.
        (
            ["--config=configs/star.py:stage=generation"],
            ["config.train.init_from='vq'", "holds no complete checkpoint"],
        ),
    ],
)
def test_train_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, args, named):
    workdir = tmp_path / "w"
    code, err = run(["train", *args, f"--workdir={workdir}"], capsys)
    assert_one_line(code, err, *named)
    assert not workdir.exists()


def test_hf_directory_that_does_not_match_the_size_is_named_field_by_field(tmp_path, capsys):
    workdir = tmp_path / "w"
    bad = write_hf_dir(tmp_path / "qwen", num_hidden_layers=2, hidden_size=32)
    args = ["--config=configs/star.py:stage=understanding", f"--config.train.init_from=('hf:{bad}',)"]
    code, err = run(["train", *args, f"--workdir={workdir}"], capsys)
    assert_one_line(code, err, "config.train.init_from", "num_layers: config 4", "hidden_size: config 64")
    assert not workdir.exists()
    # The same directory with the size's values passes (no weights are read by the check).
    good = write_hf_dir(tmp_path / "qwen_ok")
    config = star_config.get_config("size=tiny,stage=understanding")
    config.train.init_from = (f"hf:{good}",)
    assert init_sources.check_start(config, str(workdir)) is False
    (tmp_path / "empty").mkdir()
    config.train.init_from = (f"hf:{tmp_path / 'empty'}",)
    with pytest.raises(ValueError, match="config.json"):
        init_sources.check_start(config, str(workdir))
    assert not workdir.exists()


def test_init_sources_are_not_checked_when_the_stage_resumes(tmp_path):
    config = star_config.get_config("size=tiny,stage=generation")
    (tmp_path / "generation" / "ckpt" / "20").mkdir(parents=True)  # a checkpoint: the run resumes
    assert init_sources.check_start(config, str(tmp_path)) is True
    fresh = tmp_path / "fresh"
    (fresh / "vq" / "ckpt" / "5").mkdir(parents=True)
    with pytest.raises(ValueError, match="understanding holds no complete checkpoint"):
        init_sources.check_start(config, str(fresh))


def test_config_path_resolves_from_the_installed_package_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fv = common.parse(["star-jax train", "--config", "configs/star.py:size=tiny,stage=editing", "--workdir=w"])
    assert (fv.config.size, fv.config.stage) == ("tiny", "editing")
    fv = common.parse(["star-jax train", "--config=./configs/star.py:size=shapes", "--config.train.lr=0.5"])
    assert (fv.config.size, fv.config.train.lr) == ("shapes", 0.5)


# -- generate / edit / understand / eval: inputs checked before the model loads ----------------------


@pytest.mark.parametrize(
    "args,named",
    [
        (["generate", "--prompt= ", "--out=OUT"], ["--prompt is empty"]),
        (["generate", "--prompt=a red circle", "--num=0", "--out=OUT"], ["--num=0"]),
        (["generate", "--prompts=EMPTY", "--out=OUT"], ["--prompts file", "holds no prompt"]),
        (["generate", "--prompts=/no/prompts.txt", "--out=OUT"], ["--prompts file '/no/prompts.txt' does not exist"]),
        (["generate", "--prompt=a red circle", "--top_p=1.5", "--out=OUT"], ["--top_p=1.5"]),
        (["generate", "--prompt=a red circle", "--out=OUT"], ["no trained editing or generation checkpoint"]),
        (["edit", "--image=IMG", "--instruction=", "--out=OUT"], ["--instruction is empty"]),
        (["edit", "--image=IMG", "--image=IMG", "--instruction=a", "--instruction= ", "--out=OUT"], ["#2 is empty"]),
        (["edit", "--image=/no/image.png", "--instruction=make it blue", "--out=OUT"], ["/no/image.png"]),
        (["understand", "--question=  "], ["--question is empty"]),
        (["understand", "--question=what colour?", "--image=/no/image.png"], ["/no/image.png", "does not exist"]),
        (["understand", "--question=what colour?"], ["no trained"]),
        (["eval", "qa", "--stage=genration"], ["--stage 'genration' is not a stage"]),
    ],
)
def test_inference_mistakes_are_one_line_before_loading(tmp_path, capsys, args, named):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (tmp_path / "empty.txt").write_text("\n  \n")
    image = tmp_path / "img.png"
    image.write_bytes(b"not a png")  # never read: the instruction is checked first
    subs = {"OUT": str(workdir / "out"), "EMPTY": str(tmp_path / "empty.txt"), "IMG": str(image)}
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    code, err = run([*args, f"--workdir={workdir}"], capsys)
    assert_one_line(code, err, *named)
    assert os.listdir(workdir) == []


@pytest.mark.parametrize("command", [["generate", "--prompt=a", "--out=o"], ["understand", "--question=q"]])
def test_a_workdir_that_does_not_exist(tmp_path, capsys, command):
    code, err = run([*command, f"--workdir={tmp_path / 'nope'}"], capsys)
    assert_one_line(code, err, "--workdir", "does not exist")
    assert os.listdir(tmp_path) == []


# -- prompts that do not fit name config.data.max_prompt_len and the length needed ------------------


def test_a_too_long_prompt_names_the_key_and_the_length():
    with pytest.raises(sequences.SequenceTooLong) as e:
        sequences.generation_example(BuiltinTokenizer(), "red " * 40, max_prompt_len=32, num_image_tokens=4)
    assert (e.value.needed, e.value.limit) == (60, 32)
    assert "config.data.max_prompt_len" in str(e.value) and "--config.data.max_prompt_len=60" in str(e.value)


def test_bad_data_advice_for_too_long_prompts_points_at_max_prompt_len():
    bad = np.zeros(len(records.REASONS), np.int64)
    bad[records.REASON_INDEX["too_long"]] = 30
    with pytest.raises(records.BadDataError) as e:
        bad_records.check_bad_fraction(bad, 100, 0.01, 10, longest=(102, 64))
    msg = str(e.value)
    assert "config.data.max_prompt_len=64" in msg and "needs 102 tokens" in msg
    assert "--config.data.max_prompt_len=128" in msg and "raise the threshold" not in msg
    bad[records.REASON_INDEX["corrupt_image"]] = 5
    with pytest.raises(records.BadDataError, match="max_prompt_len.*For the other reasons: fix or filter"):
        bad_records.check_bad_fraction(bad, 100, 0.01, 10)


# -- a quiet console ----------------------------------------------------------------------------------


def test_library_noise_goes_to_the_log_file_not_the_console(tmp_path, capsys):
    log = tmp_path / "w" / "star_jax.log"
    with common.quiet_console():
        absl = logging.getLogger("absl")
        absl.warning("Given directory is read only=%s", "/x/ckpt")  # (checkpointing.py drops it earlier)
        absl.warning("[process=0] Finished waiting for the commit of checkpoint 20")
        logging.getLogger("jax._src.xla_bridge").warning("An NVIDIA GPU may be present on this machine, but ...")
        logging.getLogger("star_jax.data").warning("data: skipped record 3 (too_long)")
        absl.error("[process=0] a real Orbax error")
        assert not log.exists()  # kept until the command names its file
        assert common.log_to(str(log)) == str(log)
        absl.info("restored step 20")
    err = capsys.readouterr().err
    assert "read only" not in err and "Finished waiting" not in err and "NVIDIA" not in err
    assert "skipped record 3" in err and "a real Orbax error" in err
    text = log.read_text()
    for line in ("Finished waiting", "NVIDIA", "skipped record 3", "a real Orbax error", "restored step 20"):
        assert line in text
    assert common.log_to(str(tmp_path / "later.log")) is None  # restored: no log file outside a command


# -- images an edit / understand command cannot read (before any model loads) --------------------------


@pytest.mark.parametrize(
    "command", [["edit", "--instruction=make it red", "--out=OUT"], ["understand", "--question=q"]]
)
def test_an_image_without_a_defined_8_bit_meaning_is_one_line(tmp_path, capsys, command):
    """A 32-bit float image has no range to map to RGB: refused naming the file (16-bit, grey, palette
    and CMYK images are converted to 8-bit RGB, as the Qwen2.5-VL processor does)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), mode="F").save(path)
    argv = [a.replace("OUT", str(workdir / "out")) for a in command]
    code, err = run([*argv, f"--image={path}", f"--workdir={workdir}"], capsys)
    assert_one_line(code, err, str(path), "32-bit float")
    assert os.listdir(workdir) == []


# -- eval shapes control rows --------------------------------------------------------------------------


def test_eval_shapes_control_workdir_that_does_not_exist_is_one_line(tmp_path, capsys):
    """`--workdir` names the run whose VQ and untrained stack give the control rows: checked first."""
    code, err = run(
        [
            "eval",
            "shapes",
            f"--images={tmp_path}",
            f"--workdir={tmp_path / 'missing'}",
            "--write_gt=1",
            f"--out={tmp_path / 'gt'}",
        ],
        capsys,
    )
    assert_one_line(code, err, "--workdir", "missing")
    assert not (tmp_path / "gt").exists()


def test_a_released_star_pt_without_allow_pickle_is_one_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "STAR-3B.pt"
    torch.save({"state_dict": {"pixel_output_head.bias": torch.zeros(2, dtype=torch.bfloat16)}}, path)
    args = ["import", "--config=configs/star.py:size=tiny,stage=generation", f"--workdir={tmp_path / 'w'}"]
    code, err = run([*args, f"--star={path}"], capsys)
    assert_one_line(code, err, "STAR-3B.pt", "--allow_pickle")
    assert not (tmp_path / "w" / "generation").exists()
