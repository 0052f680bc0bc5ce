"""Tokenizers and chat templates: coverage of the shapes world, Qwen's template and specials, CFG rows, HF wrapper."""

import json

import numpy as np
import pytest

from star_jax.shapes import captions
from star_jax.shapes.splits import make_example
from star_jax.text import chat
from star_jax.text.tokenizer import QWEN_SPECIALS, BuiltinTokenizer, HFTokenizer, load_tokenizer

TOK = BuiltinTokenizer()
TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "a photo of a red circle<|im_end|>\n<|im_start|>assistant\n"
)


def test_vocabulary_fits_and_specials_are_named():
    assert TOK.vocab_size <= 512
    ids = [TOK.special(name) for name in QWEN_SPECIALS]
    assert len(set(ids)) == len(ids) and max(ids) < 16
    assert TOK.pad_id == TOK.special("<|endoftext|>")
    with pytest.raises(ValueError, match="special: unknown special token"):
        TOK.special("<|video_pad|>")
    assert load_tokenizer("builtin").encode("red") == TOK.encode("red")


def test_chat_template_is_qwens():
    assert chat.chat_prompt("a photo of a red circle") == TEMPLATE
    ids = chat.generation_ids(TOK, "a photo of a red circle")
    assert [TOK.tokens[i] for i in ids[-4:]] == ["<|im_start|>", "assistant", "\n", "<|vision_start|>"]
    assert TOK.decode(ids) == TEMPLATE + "<|vision_start|>"
    # As with Qwen's tokenizer, the user text starts at index 14.
    assert ids[:14] == TOK.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert ids[14:20] == TOK.encode("a photo of a red circle")


@pytest.mark.parametrize("stems", [False, True])
@pytest.mark.parametrize("split", ["train", "validation", "heldout"])
def test_every_shapes_text_tokenizes(split, stems):
    tok = BuiltinTokenizer(stems=stems)
    for i in range(150):
        pair, qa, edit = (make_example(split, i, kind, resolution=8) for kind in ("pair", "qa", "edit"))
        grounding = captions.grounding_question(np.random.default_rng(i), qa["scene"], split=split) or ("", "")
        for text in (pair["caption"], qa["question"], qa["answer"], edit["instruction"], *grounding[:2]):
            ids = tok.encode(text, strict=True)
            assert tok.decode(ids) == text
            assert tok.unk_id not in ids
        prompt = chat.generation_ids(tok, pair["caption"])
        assert len(prompt) <= 64  # config.data.max_prompt_len


def test_stems_share_the_singulars_token():
    tok = load_tokenizer("builtin-stems")
    assert [tok.tokens[i] for i in tok.encode("how many crosses and triangles?")] == [
        "how", "many", "cross", "es", "and", "triangle", "s", "?"
    ]  # fmt: skip
    assert tok.encode("triangles")[0] == tok.encode("triangle")[0] and tok.vocab_size == TOK.vocab_size
    assert TOK.encode("triangles") == [TOK.ids["triangles"]]  # the plain tokenizer is unchanged
    assert tok.decode(tok.encode("two red crosses, one square.")) == "two red crosses, one square."


def test_unknown_words():
    assert TOK.encode("a zebra") == [TOK.encode("a")[0], TOK.unk_id]
    assert TOK.unknown_words("a zebra and a cat") == ["zebra", "cat"]
    with pytest.raises(ValueError, match="unknown words"):
        TOK.encode("a zebra", strict=True)
    assert TOK.decode(TOK.encode("1 2, 3")) == "12, 3"  # digits are single tokens
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([TOK.vocab_size])


def test_unconditional_row():
    ids = chat.generation_ids(TOK, "a photo of two blue squares")
    fim = TOK.special("<|fim_pad|>")
    uncond = chat.unconditional_ids(ids, fim)
    assert len(uncond) == len(ids) and uncond[0] == ids[0] and uncond[-4:] == ids[-4:]
    assert set(uncond[1:-4]) == {fim}
    batch = np.array([ids, ids])
    np.testing.assert_array_equal(chat.unconditional_ids(batch, fim), np.array([uncond, uncond]))


def test_understanding_ids_mask_the_answer():
    ids, mask = chat.understanding_ids(TOK, "what color is the circle?", "red", num_image_tokens=3)
    assert len(ids) == len(mask)
    assert [t for t, m in zip(ids, mask, strict=True) if m] == TOK.encode("red") + [TOK.special("<|im_end|>")]
    assert ids.count(TOK.special("<|image_pad|>")) == 3
    text = TOK.decode(ids)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>what" in text
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>")


@pytest.fixture
def qwen_like_json(tmp_path):
    """A tiny word-level tokenizer.json whose special tokens carry Qwen's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "a", "photo", "of", "red", "circle", "system", "user", "assistant", "\n"]
    vocab = {w: i for i, w in enumerate(words)}
    qwen_ids = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652}
    qwen_ids.update(
        {"<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|fim_pad|>": 151662}
    )
    vocab.update(qwen_ids)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(qwen_ids))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, qwen_ids


def test_hf_tokenizer_wrapper(qwen_like_json):
    path, qwen_ids = qwen_like_json
    tok = HFTokenizer(str(path.parent))  # a directory holding tokenizer.json works too
    for name, i in qwen_ids.items():
        assert tok.special(name) == i
    assert tok.pad_id == 151643 and tok.vocab_size >= 151663
    ids = tok.encode("<|im_start|>a photo of a red circle<|vision_start|>")
    assert ids[0] == 151644 and ids[-1] == 151652 and ids[1:-1] == [1, 2, 3, 1, 4, 5]
    assert tok.decode(ids).startswith("<|im_start|>")
    with pytest.raises(ValueError, match="not a token"):
        tok.special("<|video_pad|>")
    with pytest.raises(FileNotFoundError):
        HFTokenizer(str(path.parent / "missing.json"))
    assert json.loads(path.read_text())["model"]["type"] == "WordLevel"
