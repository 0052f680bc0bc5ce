"""The reference's editing and implicit reasoning (STAR_SPEC sections 4-5) side by side with a
PyTorch procedure written from the spec (`bench/torch_reference.py`: transformers Qwen2.5-VL text
model and vision tower, sequences assembled there): greedy image tokens are identical on random
weights at the `tiny` size, through `StarRunner` (left-padded batches, smart_resize, the VQ)."""

import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("transformers")

from star_jax import init_sources, main, sharding  # noqa: E402
from star_jax.bench import torch_reference  # noqa: E402
from star_jax.cli import generate as generate_cli  # noqa: E402
from star_jax.configs import star as star_config  # noqa: E402
from star_jax.convert import importer  # noqa: E402
from star_jax.convert.stage_reader import build_star  # noqa: E402
from star_jax.decode import runner as runner_lib  # noqa: E402
from star_jax.text import tokenizer  # noqa: E402

GREEDY = dict(cfg=3.0, temperature=0.0)


def random_star(config, seed: int = 0):
    """The tiny STAR (editing stage: base, ViT, stack, adapter, head, VQ), every weight random."""
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, rngs=nnx.Rngs(seed)), mesh)
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(state):
        a = var.get_value()
        if not np.issubdtype(a.dtype, np.floating):
            var.set_value(np.zeros(a.shape, a.dtype))
            continue
        fan_in = a.shape[-2] if a.ndim >= 2 else 1
        scale = 1.0 if path[-1] in ("embedding", "codebook") else 1 / np.sqrt(max(fan_in, 1))
        value = rng.standard_normal(a.shape) * scale
        if path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(a.shape)
        var.set_value(value.astype(a.dtype))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def stack():
    config = star_config.get_config("size=tiny,stage=editing")
    config.model.decoder.dtype = "float32"
    model = random_star(config)
    previous = torch_reference.set_num_threads(1)
    yield config, model, torch_reference.TorchStarVL(model), tokenizer.load_tokenizer(config.data.tokenizer)
    torch_reference.set_num_threads(previous)


def _image(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8)


@pytest.mark.parametrize("shape", [(84, 84), (56, 140)], ids=["square", "wide"])
def test_edit_greedy_tokens_equal_the_torch_procedure(stack, shape):
    config, model, ref, tok = stack
    runner = runner_lib.StarRunner(model, config, tok)
    image = _image(*shape, seed=shape[1])
    instruction = "make the red circle blue"
    codes = runner.edit_codes([image], [instruction], **GREEDY)[0]
    ((pixels, grid),) = runner.vit_inputs([image], editing=True)
    h, w = grid[1] * 14, grid[2] * 14
    assert (h / w > 1) == (shape[0] / shape[1] > 1) and (h == w) == (shape[0] == shape[1])  # aspect kept
    src = np.asarray(runner_lib.vq_call(model.vq, "encode_to_codes", runner_lib.to_float([image], runner.image_size)))
    sample = torch_reference.SampleConfig(cfg_weight=GREEDY["cfg"], temperature=0.0)
    want = torch_reference.edit_codes(
        ref, tok, instruction, src.reshape(-1), pixels, grid, num_tokens=runner.num_tokens, sample=sample
    )
    np.testing.assert_array_equal(codes, want)
    assert len(np.unique(want)) > 4


def test_reasoning_greedy_tokens_equal_the_torch_procedure(stack):
    config, model, ref, tok = stack
    runner = runner_lib.StarRunner(model, config, tok)
    prompt = "a red circle left of a blue square"
    text, _, codes = runner.reason_then_draw(prompt, max_reasoning_tokens=12, **GREEDY)
    sample = torch_reference.SampleConfig(cfg_weight=GREEDY["cfg"], temperature=0.0)
    answer, want = torch_reference.reasoning_codes(
        ref,
        tok,
        prompt,
        suffix=runner_lib.REASONING_SUFFIX,
        num_tokens=runner.num_tokens,
        sample=sample,
        max_answer_tokens=12,
        num_ids=tok.vocab_size,
    )
    assert text == tok.decode(answer) + runner_lib.REASONING_SUFFIX and len(answer) > 0
    np.testing.assert_array_equal(codes[0], want)


def test_text_to_image_greedy_tokens_equal_the_torch_procedure(stack):
    config, model, ref, tok = stack
    runner = runner_lib.StarRunner(model, config, tok)
    prompts = ["a red circle", "two blue squares above a green triangle"]  # the first is left-padded
    _, codes = runner.text_to_image(prompts, **GREEDY)
    sample = torch_reference.SampleConfig(cfg_weight=GREEDY["cfg"], temperature=0.0)
    for prompt, got in zip(prompts, codes):
        want = torch_reference.text_to_image_codes(ref, tok, prompt, num_tokens=runner.num_tokens, sample=sample)
        np.testing.assert_array_equal(got, want)


# -- the commands on a saved stage: reference defaults, bad inputs (one line, nothing written) ---------


@pytest.fixture(scope="module")
def workdirs(stack, tmp_path_factory):
    """Two workdirs holding the tiny stage at step 0: one as `star-jax import --star` writes it, one
    as a run of this project (no `star:` source)."""
    config, model, _, _ = stack
    root = tmp_path_factory.mktemp("reference_paths")
    out = {}
    for name, init_from in (("imported", ("star:/ckpt/STAR-3B.pt",)), ("trained", ())):
        saved = config.copy_and_resolve_references()
        saved.train.init_from = init_from
        saved.train.sample_cfg = 2.5
        importer.save_stage(model, saved, str(root / name))
        out[name] = str(root / name)
    return out


def _run(argv, capsys):
    capsys.readouterr()
    try:
        code = main.run(["star-jax", *argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_sampling_defaults_follow_where_the_weights_come_from(workdirs):
    fv = flags.FlagValues()
    generate_cli.sampling_flags(fv)
    fv(["prog", "--workdir=w", "--out=o"])
    got = {}
    for name, workdir in workdirs.items():
        config = init_sources.read_stage_config(workdir, "editing")
        got[name] = generate_cli.sampling_settings(fv, workdir, "editing", config)
    assert got["imported"] == dict(cfg=5.0, top_k=1000, top_p=1.0, temperature=1.0, reference_numerics=False)
    assert got["trained"] == dict(cfg=2.5, top_k=0, top_p=1.0, temperature=1.0, reference_numerics=False)
    fv(["prog", "--workdir=w", "--out=o", "--cfg=1.1", "--top_p=0.8", "--reference_numerics"])
    config = init_sources.read_stage_config(workdirs["imported"], "editing")
    mixed = generate_cli.sampling_settings(fv, workdirs["imported"], "editing", config)
    assert mixed == dict(cfg=1.1, top_k=1000, top_p=0.8, temperature=1.0, reference_numerics=True)


def _png16_grey(path, h, w):
    values = (np.arange(h * w, dtype=np.uint16).reshape(h, w) * 37) % 65535
    Image.fromarray(values.astype(np.uint16)).save(path)  # PIL writes mode I;16 as a 16-bit grey PNG
    return str(path)


@pytest.mark.parametrize(
    "command,named",
    [
        (["edit", "--image=SMALL", "--instruction=make it red"], ["--image", "small.png", "minimum side of 28"]),
        (["edit", "--image=OK", "--instruction=" + "red " * 300], ["--instruction", "config.data.max_prompt_len=256"]),
        # A 16-bit grey, non-square source is read (scaled to 8-bit RGB): the next check is the prompt's.
        (["edit", "--image=GREY16", "--instruction=" + "red " * 300], ["--instruction", "needs 3"]),
        (["generate", "--prompt=" + "red " * 400], ["--prompt", "config.data.max_prompt_len=256"]),
        (["generate", "--prompt=a red circle", "--image_size=30"], ["--image_size=30", "multiple"]),
        (["understand", "--image=SMALL", "--question=what colour?"], ["--image", "small.png", "minimum side"]),
    ],
)
def test_inputs_that_do_not_fit_the_model_are_one_line_and_write_nothing(workdirs, tmp_path, capsys, command, named):
    Image.fromarray(_image(20, 300, 0)).save(tmp_path / "small.png")
    Image.fromarray(_image(64, 64, 1)).save(tmp_path / "ok.png")
    grey16 = _png16_grey(tmp_path / "grey16.png", 40, 90)
    assert Image.open(grey16).mode.startswith("I;16")
    subs = {"=SMALL": str(tmp_path / "small.png"), "=OK": str(tmp_path / "ok.png"), "=GREY16": grey16}
    for key, value in subs.items():
        command = [a.replace(key, "=" + value) for a in command]
    out = [] if command[0] == "understand" else [f"--out={tmp_path / 'out'}"]
    code, err = _run([*command, f"--workdir={workdirs['trained']}", *out], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()
