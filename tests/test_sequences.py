"""Sequence assembly against STAR_SPEC sections 3-4, with the built-in tokenizer."""

import numpy as np
import pytest

from star_jax import sequences
from star_jax.models import positions
from star_jax.text import chat, tokenizer

TOK = tokenizer.BuiltinTokenizer()
VS, VE = TOK.special("<|vision_start|>"), TOK.special("<|vision_end|>")
FIM = TOK.special("<|fim_pad|>")


def _real(ex, key):
    return ex[key][ex["prompt_mask"]]


def test_generation_layout_and_unconditional_row():
    ex = sequences.generation_example(TOK, "a photo of a red circle", max_prompt_len=40, num_image_tokens=64)
    ids = _real(ex, "prompt_ids").tolist()
    assert ids == chat.generation_ids(TOK, "a photo of a red circle")
    assert TOK.decode(ids[-4:]) == "<|im_start|>assistant\n<|vision_start|>"
    assert sequences.user_insert_index(ids, TOK) == 14  # as with Qwen's tokenizer
    uncond = _real(ex, "uncond_ids").tolist()
    assert uncond[0] == ids[0] and uncond[-4:] == ids[-4:] and set(uncond[1:-4]) == {FIM}
    # Left padding: prompt positions 0..L-1, image token j at L + j, all three streams equal.
    pos = ex["positions"]
    assert pos.shape == (3, 40 + 64)
    n = len(ids)
    np.testing.assert_array_equal(pos[:, 40 - n :], np.broadcast_to(np.arange(n + 64), (3, n + 64)))


def test_editing_layout_matches_spec_and_position_builder():
    grid, merge, nvq = (1, 8, 8), 2, 64
    ex = sequences.editing_example(
        TOK,
        "make the red circle blue",
        max_prompt_len=160,
        num_vq_tokens=nvq,
        vit_grid_thw=grid,
        spatial_merge_size=merge,
    )
    ids = _real(ex, "prompt_ids").tolist()
    e = chat.generation_ids(TOK, "make the red circle blue")
    n_vit = 16
    newline = TOK.encode("\n")
    expected = e[:14] + [VS] + [TOK.special("<|vision_pad|>")] * nvq + [VE, VS] + [TOK.special("<|image_pad|>")] * n_vit
    expected += [VE] + newline + e[14:]
    assert ids == expected
    src, vit = _real(ex, "src_mask"), _real(ex, "vit_mask")
    assert src.sum() == nvq and np.all(src[15 : 15 + nvq])
    assert vit.sum() == n_vit and np.all(vit[15 + nvq + 2 : 15 + nvq + 2 + n_vit])
    # The unconditional row (STAR_SPEC section 4, corrected): every text id of E in [1 : -4] is
    # <|fim_pad|> (system turn, user turn start, instruction, <|im_end|>\n); the first id, the last 4
    # and both image blocks (with the newline after them) are kept.
    uncond = _real(ex, "uncond_ids").tolist()
    middle = len(expected) - len(e)  # the inserted blocks
    assert uncond[0] == ids[0] and set(uncond[1:14]) == {FIM}
    assert uncond[14 : 14 + middle] == ids[14 : 14 + middle]
    assert set(uncond[14 + middle : -4]) == {FIM} and uncond[-4:] == ids[-4:]
    assert TOK.decode(uncond[-4:]) == "<|im_start|>assistant\n<|vision_start|>"
    assert len(uncond) == len(ids)
    # Positions: an independent implementation (positions.editing_positions) agrees.
    pos = ex["positions"][:, 160 - len(ids) :]
    ref = positions.editing_positions(len(e), grid, insert_at=14, num_vq_tokens=nvq, spatial_merge_size=merge)
    np.testing.assert_array_equal(pos[:, : len(ids)], ref)
    # Generated tokens continue 1-D from max + 1.
    np.testing.assert_array_equal(pos[:, len(ids) :], np.broadcast_to(ref.max() + 1 + np.arange(nvq), (3, nvq)))


def test_understanding_targets_cover_answer_and_im_end():
    ex = sequences.understanding_example(
        TOK, "how many circles are there?", "two", max_prompt_len=64, vit_grid_thw=(1, 8, 8), spatial_merge_size=2
    )
    ids = _real(ex, "prompt_ids").tolist()
    targets = _real(ex, "text_targets").tolist()
    reply = TOK.encode("two") + [TOK.special("<|im_end|>")]
    assert ids[-len(reply) :] == reply
    # position i predicts token i + 1
    predicted = [t for t in targets if t >= 0]
    assert predicted == reply
    assert targets[len(ids) - len(reply) - 1] == reply[0]
    assert _real(ex, "vit_mask").sum() == 16
    first = ids.index(TOK.special("<|image_pad|>"))
    pos = ex["positions"][:, 64 - len(ids) :]
    assert pos[1, first + 15] == pos[0, first] + 3  # the ViT block spans a 4 x 4 merged grid


def test_follow_up_turns_follow_qwens_multi_turn_template():
    turns = [("what color is the circle?", "red"), ("how many objects are there?", "two"), ("is there a cross?", "no")]
    ex = sequences.understanding_example(
        TOK, *turns[0], max_prompt_len=128, vit_grid_thw=(1, 8, 8), spatial_merge_size=2, follow_ups=tuple(turns[1:])
    )
    ids = _real(ex, "prompt_ids").tolist()
    # Qwen2.5's chat template: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`.
    messages = [("system", "You are a helpful assistant.")]
    for i, (q, a) in enumerate(turns):
        messages += [("user", (chat.image_placeholder(16) if i == 0 else "") + q), ("assistant", a)]
    expected = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    assert TOK.decode(ids) + "\n" == expected  # the sequence ends at the last answer's <|im_end|>
    # Targets: exactly every answer + <|im_end|>, each predicted from the token before it.
    targets = _real(ex, "text_targets").tolist()
    im_end = TOK.special("<|im_end|>")
    spans = [TOK.encode(a) + [im_end] for _, a in turns]
    assert [t for t in targets if t >= 0] == [t for span in spans for t in span]
    for i, t in enumerate(targets):
        if t >= 0:
            assert ids[i + 1] == t
    # The follow-up turns are text: 1-D positions continuing after the ViT block.
    pos = ex["positions"][:, 128 - len(ids) :]
    last_image = len(ids) - 1 - ids[::-1].index(TOK.special("<|image_pad|>"))
    tail = pos[:, last_image + 1 :]
    assert (tail == tail[0]).all() and (np.diff(tail[0]) == 1).all()


def test_too_long_and_empty_inputs_raise():
    with pytest.raises(sequences.SequenceTooLong, match="exceeds max_prompt_len=10"):
        sequences.generation_example(TOK, "a photo of a red circle", max_prompt_len=10, num_image_tokens=4)
    with pytest.raises(ValueError, match="empty caption"):
        sequences.generation_example(TOK, "  ", max_prompt_len=40, num_image_tokens=4)


def test_bag_of_words_is_the_set_of_caption_tokens():
    tok = TOK
    words = sequences.bag_of_words(tok, "two red circles and a red square", tok.vocab_size)
    assert words.shape == (tok.vocab_size,) and words.dtype == np.float32
    assert set(np.flatnonzero(words)) == set(tok.encode("two red circles and a square"))
    assert words.sum() == 6  # "red" twice counts once
    with pytest.raises(ValueError, match="empty caption"):
        sequences.bag_of_words(tok, "", tok.vocab_size)
    with pytest.raises(ValueError, match="vocab_size=10"):
        sequences.bag_of_words(tok, "a red circle", 10)


def test_reasoning_row_is_head_answer_suffix_tail():
    answer = TOK.encode("two red circles")
    ex = sequences.reasoning_example(
        TOK, "what is one plus one red circles?", answer, " red square", max_prompt_len=64, num_image_tokens=4
    )
    ids = _real(ex, "prompt_ids").tolist()
    e = chat.generation_ids(TOK, "what is one plus one red circles?")
    assert ids == e[:14] + answer + TOK.encode(" red square") + e[-6:]
    assert TOK.decode(e[-6:]) == "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
    uncond = _real(ex, "uncond_ids").tolist()
    assert uncond == chat.unconditional_ids(ids, FIM)
    assert ex["positions"].shape == (3, 64 + 4)
    no_suffix = sequences.reasoning_example(TOK, "a circle", answer, "", max_prompt_len=64, num_image_tokens=4)
    assert _real(no_suffix, "prompt_ids").tolist() == e[:14] + answer + e[-6:]
    with pytest.raises(sequences.SequenceTooLong):
        sequences.reasoning_example(TOK, "a circle", answer * 20, "", max_prompt_len=64, num_image_tokens=4)
