"""The lab's path, end to end through the CLI only (issue 35): a transformers-saved Qwen2.5-VL (with its
tokenizer.json) and a VQ file in the reference layout -> `import` a generation stage -> `train` two
steps (resuming from the imported step) -> `generate`, `edit`, `understand` -> `export --format hf
--verify` -> the export loads in transformers. Plus the failure modes of a start: each is one line
on stderr, and nothing is written that changes what `generate`, `export` or a rerun does."""

import json
import os

import hf_fixtures
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from star_jax import checkpointing, init_sources, train
from star_jax import main as star_main
from star_jax.configs import star as star_config
from star_jax.convert import tensor_io, vq_table
from star_jax.convert.stage_reader import abstract_star, restore_stage_params
from star_jax.text import tokenizer

CONFIG = "--config=configs/star.py:size=tiny,stage={stage},runlocal=True"
PROMPT_LEN = "--config.data.max_prompt_len=128"  # a tiny edit prompt holds 64 VQ + 4 ViT tokens + text


def tiny(stage="generation"):
    return star_config.get_config(f"size=tiny,stage={stage},runlocal=True")


def save_qwen25vl(path: str, *, vocab: int | None = None, layers: int | None = None, tok_json: bool = True) -> dict:
    """A random Qwen2.5-VL of the tiny size saved with transformers (special ids: the built-in
    tokenizer's), with the built-in vocabulary as its tokenizer.json. Returns the torch state dict."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = tiny().model.decoder
    tok = tokenizer.BuiltinTokenizer()
    text, vis = hf_fixtures.qwen25vl_parts(d, tiny().model.vision, vocab=vocab, layers=layers)
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vis,
        tie_word_embeddings=d.tie_embeddings,
        image_token_id=tok.special("<|image_pad|>"),
        video_token_id=tok.special("<|vision_pad|>"),
        vision_start_token_id=tok.special("<|vision_start|>"),
        vision_end_token_id=tok.special("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model = hf_fixtures.randomize_(Qwen2_5_VLForConditionalGeneration(cfg), 0).eval()
    model.save_pretrained(path)
    if tok_json:
        tokenizer.write_builtin_tokenizer_json(os.path.join(path, "tokenizer.json"))
    return {k: t.detach().numpy() for k, t in model.state_dict().items()}


def save_reference_vq(path: str, seed: int = 1) -> dict:
    """Random tiny-size VQ weights under the reference (torch) names, as safetensors."""
    model = abstract_star(tiny("vq"), "vq")
    rng = np.random.RandomState(seed)
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(model.vq, nnx.Param)):
        name, transform = vq_table.ref_name("/".join(map(str, p)))
        out[name] = (0.1 * rng.randn(*transform.ref_shape(var.get_value().shape))).astype(np.float32)
    tensor_io.save_safetensors(path, out)
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    hf_dir, vq_file = str(root / "qwen"), str(root / "star-vq.safetensors")
    return hf_dir, save_qwen25vl(hf_dir), vq_file, save_reference_vq(vq_file)


def run(*args) -> int:
    return star_main.run(["star-jax", *args])


def listing(path) -> list[str]:
    """Every file and directory under `path`, relative (empty when it does not exist)."""
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) for n in dirs + files]
    return sorted(out)


@pytest.mark.slow
def test_published_weights_to_a_trained_generation_stage(published, tmp_path, capsys):
    hf_dir, torch_state, vq_file, vq_ref = published
    w, out = str(tmp_path / "w"), tmp_path / "out"
    gen = CONFIG.format(stage="generation")

    assert run("import", gen, PROMPT_LEN, f"--workdir={w}", f"--hf={hf_dir}", f"--vq={vq_file}", "--verify") == 0
    printed = capsys.readouterr().out
    assert "tokenizer:" in printed and "verify: largest difference" in printed
    largest = float(printed.split("verify: largest difference")[1].split()[0])
    assert largest < 1e-4, printed
    for name in ("hf_text_logits", "hf_vision", "image_logits", "vq_tensors"):
        assert f"verify {name}:" in printed
    saved = json.loads((tmp_path / "w" / "generation" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == os.path.join(w, "tokenizer.json")
    assert saved["train"]["init_from"] == [f"hf:{hf_dir}", f"vq:{vq_file}"]
    imported = restore_stage_params(w, "generation", 0)
    # The base and ViT are the directory's, the VQ the file's, the stack the base's last 2 layers.
    np.testing.assert_array_equal(imported["base/embedding"], torch_state["model.language_model.embed_tokens.weight"])
    patch = torch_state["model.visual.patch_embed.proj.weight"]
    np.testing.assert_array_equal(imported["vision/patch_kernel"], patch.reshape(patch.shape[0], -1).T)
    np.testing.assert_array_equal(imported["vq/quantize/embedding"], vq_ref["quantize.embedding.weight"])
    up = imported["base/stack/layers/mlp/up/kernel"]
    np.testing.assert_array_equal(imported["stacked_ar/layers/mlp/up/kernel"], up[-2:])

    # train resumes from the imported step 0 with the imported tokenizer; frozen parts stay bit-identical.
    train = ["train", gen, PROMPT_LEN, f"--workdir={w}", "--config.train.num_steps=2"]
    assert run(*train) == 0
    assert checkpointing.complete_steps(os.path.join(w, "generation")) == [0, 2]
    trained = restore_stage_params(w, "generation", 2)
    np.testing.assert_array_equal(trained["base/embedding"], imported["base/embedding"])
    assert not np.array_equal(trained["image_head/kernel"], imported["image_head/kernel"])
    saved = json.loads((tmp_path / "w" / "generation" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == os.path.join(w, "tokenizer.json") and saved["train"]["num_steps"] == 2

    assert run("generate", f"--workdir={w}", "--prompt=a photo of a red circle", f"--out={out / 'gen'}") == 0
    assert (out / "gen" / "00000_0.png").exists()
    image = str(tmp_path / "in.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    assert (
        run("edit", f"--workdir={w}", f"--image={image}", "--instruction=make the circle blue", f"--out={out / 'e'}")
        == 0
    )
    assert (out / "e" / "edit_000.png").exists()
    capsys.readouterr()
    assert run("understand", f"--workdir={w}", f"--image={image}", "--question=how many circles are there?") == 0
    assert capsys.readouterr().err.count("\n") <= 1  # no tracebacks, no Orbax read-only warnings

    hf_out = str(out / "hf")
    assert run("export", f"--workdir={w}", f"--out={hf_out}", "--format=hf", "--verify") == 0
    printed = capsys.readouterr().out
    assert float(printed.split("verify: largest difference")[1].split()[0]) < 1e-4
    from transformers import Qwen2_5_VLForConditionalGeneration

    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_out, local_files_only=True, dtype="float32")
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.no_grad():
        original = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, local_files_only=True, dtype="float32")
        np.testing.assert_allclose(
            exported(input_ids=ids).logits.numpy(), original(input_ids=ids).logits.numpy(), atol=1e-5, rtol=0
        )
    assert tokenizer.HFTokenizer(hf_out).encode("a red circle") == tokenizer.BuiltinTokenizer().encode("a red circle")


def _one_line_failure(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.slow
def test_import_understanding_and_vq_stages_and_verify(published, tmp_path, capsys):
    """stage=understanding needs only --hf, stage=vq only --vq (its PatchGAN starts fresh); --verify
    works for both."""
    hf_dir, _, vq_file, vq_ref = published
    w = str(tmp_path / "w")
    assert run("import", CONFIG.format(stage="understanding"), f"--workdir={w}", f"--hf={hf_dir}", "--verify") == 0
    printed = capsys.readouterr().out
    assert "verify hf_text_logits" in printed and "verify hf_vision" in printed and "image_logits" not in printed
    assert run("import", CONFIG.format(stage="vq"), f"--workdir={w}", f"--vq={vq_file}", "--verify") == 0
    printed = capsys.readouterr().out
    assert "verify vq_tensors: max |star_jax - torch| = 0.000e+00" in printed
    vq = restore_stage_params(w, "vq", 0)
    assert any(k.startswith("discriminator/") for k in vq)
    np.testing.assert_array_equal(vq["vq/quantize/embedding"], vq_ref["quantize.embedding.weight"])
    assert sorted(os.listdir(w)) == ["tokenizer.json", "understanding", "vq"]
    # A second import of the same stage is refused and changes nothing.
    before = listing(w)
    rc = run("import", CONFIG.format(stage="vq"), f"--workdir={w}", f"--vq={vq_file}")
    _one_line_failure(capsys, rc, "already holds a checkpoint")
    assert listing(w) == before


@pytest.mark.parametrize(
    "case",
    ["missing_vq_flag", "mismatched_hf", "missing_hf", "tokenizer_too_big", "special_ids", "vq_file_for_understanding"],
)
def test_import_mistakes_are_one_line_and_write_nothing(published, tmp_path, capsys, case):
    hf_dir, _, vq_file, _ = published
    w = str(tmp_path / "w")
    args = ["import", CONFIG.format(stage="generation"), f"--workdir={w}"]
    if case == "missing_vq_flag":
        needles, args = ("stage 'generation' needs vq: pass --vq",), args + [f"--hf={hf_dir}"]
    elif case == "mismatched_hf":  # a 2-layer directory for the 4-layer tiny base
        bad = str(tmp_path / "two_layers")
        save_qwen25vl(bad, layers=2)
        needles, args = ("num_layers: config 4", bad), args + [f"--hf={bad}", f"--vq={vq_file}"]
    elif case == "missing_hf":
        needles, args = ("no such directory",), args + [f"--hf={tmp_path / 'nope'}", f"--vq={vq_file}"]
    elif case == "tokenizer_too_big":  # a tokenizer needing more ids than the decoder has
        big = str(tmp_path / "big.json")
        tokenizer.write_builtin_tokenizer_json(big)
        spec = json.loads(open(big).read())
        spec["model"]["vocab"]["zebra"] = 300
        open(big, "w").write(json.dumps(spec))
        needles = ("301 ids", "the decoder 256")
        args += [f"--hf={hf_dir}", f"--vq={vq_file}", f"--config.data.tokenizer={big}"]
    elif case == "special_ids":  # the base's config.json and the tokenizer disagree on <|image_pad|>
        other = str(tmp_path / "other")
        save_qwen25vl(other, tok_json=False)
        cfg = json.loads(open(os.path.join(other, "config.json")).read())
        cfg["image_token_id"] = 200
        open(os.path.join(other, "config.json"), "w").write(json.dumps(cfg))
        needles = ("<|image_pad|> is 200 there, 6 in the tokenizer", "the tokenizer has 140 ids, the decoder 256")
        args += [f"--hf={other}", f"--vq={vq_file}"]
    else:
        args = ["import", CONFIG.format(stage="understanding"), f"--workdir={w}", f"--hf={hf_dir}", f"--vq={vq_file}"]
        needles = ("has no part that --vq loads",)
    capsys.readouterr()  # transformers' progress bars of the set-up
    _one_line_failure(capsys, run(*args), *needles)
    assert listing(w) == []


@pytest.mark.slow
def test_failed_train_starts_leave_nothing(published, tmp_path, capsys, monkeypatch):
    """A bad source, a mismatched HF directory or a tokenizer that does not fit stop `train` at start
    with one line and write nothing; a crash before the first checkpoint removes what it wrote; what a
    killed first start left counts for nothing (`export` without --stage is not misled) and a rerun
    starts clean."""
    hf_dir, _, vq_file, _ = published
    w = str(tmp_path / "w")
    bad = str(tmp_path / "two_layers")
    save_qwen25vl(bad, layers=2)
    big = str(tmp_path / "big.json")
    tokenizer.write_builtin_tokenizer_json(big)
    spec = json.loads(open(big).read())
    spec["model"]["vocab"]["zebra"] = 300
    open(big, "w").write(json.dumps(spec))
    cases = {
        (f"hf:{bad}",): "num_layers: config 4",
        (f"hf:{tmp_path / 'nope'}", f"vq:{vq_file}"): "no such directory",
        (f"vq:{tmp_path / 'missing.safetensors'}",): "no such file",
        ("understanding",): "holds no complete checkpoint",
        ("big",): "the tokenizer has 301 ids, the decoder 256",
    }
    for sources, needle in cases.items():
        config = tiny()
        config.train.init_from = () if sources == ("big",) else sources
        config.data.tokenizer = big if sources == ("big",) else "builtin"
        with pytest.raises(ValueError, match=needle) as e:
            train.train_and_evaluate(config, w)
        assert "\n" not in str(e.value)
        assert listing(w) == []

    # Through the CLI: one line, exit 2, no stage directory (the CLI keeps its log, star_jax.log).
    capsys.readouterr()
    args = [CONFIG.format(stage="generation"), f"--workdir={w}", f"--config.data.tokenizer={big}"]
    rc = run("train", *args, "--config.train.init_from=()")
    _one_line_failure(capsys, rc, "the tokenizer has 301 ids, the decoder 256")
    assert listing(w) in ([], ["star_jax.log"])
    if os.path.exists(os.path.join(w, "star_jax.log")):
        os.remove(os.path.join(w, "star_jax.log"))

    # A crash before the first checkpoint (here: when the frozen params are saved) removes what the start wrote.
    config = tiny("vq")
    config.vq_loss.disc_weight = 0.0  # no PatchGAN: a smaller model to build

    def crash(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpointing.StageCheckpoints, "save_frozen", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train.train_and_evaluate(config, w)
    assert listing(w) == []
    # A killed start (no clean-up ran) leaves files but no config.json: not a stage.
    monkeypatch.setattr(checkpointing, "discard_incomplete", lambda *a: False)
    with pytest.raises(RuntimeError, match="disk full"):
        train.train_and_evaluate(config, w)
    monkeypatch.undo()
    assert listing(w) and not os.path.exists(os.path.join(w, "vq", "config.json"))
    assert init_sources.first_trained_stage(w, ("vq",)) is None
    capsys.readouterr()
    assert run("export", f"--workdir={w}", f"--out={tmp_path / 'x'}") == 2
    assert "no stage with a config.json" in capsys.readouterr().err
    # A rerun starts clean: the leftovers are gone before the trainer builds anything.
    os.makedirs(os.path.join(w, "vq", "frozen", "stale"))
    seen = []
    monkeypatch.setattr(train, "_train", lambda config, workdir, task: seen.append(listing(workdir)) or {})
    assert train.train_and_evaluate(config, w) == {} and seen == [[]]
