"""Sequence assembly for every LM stage, exactly as STAR_SPEC sections 3-4, in numpy per example.

Every builder returns fixed-length arrays (left-padded prompts), so batches have static shapes and
the image tokens always sit at the end of the sequence:

  prompt_ids  [Tp] int32   chat prompt; generation / editing prompts end with <|vision_start|>
  uncond_ids  [Tp] int32   the CFG unconditional row (prompt text -> <|fim_pad|>, image blocks kept)
  prompt_mask [Tp] bool    True = real token (False = left padding)
  positions   [3, Tp + N] int32  M-RoPE streams (1-D text, (t, h, w) for ViT blocks), N image tokens
  vit_mask    [Tp] bool    slots that take ViT embeddings (understanding image, edit source)
  src_mask    [Tp] bool    slots that take adapter(codebook[source code]) (editing)
  text_targets [Tp] int32  next-token targets for understanding (-1 = no loss)
  caption_words [V] float32  multi-hot of the caption's tokens (labels of an image classifier)

Too-long inputs raise `SequenceTooLong` (the input pipeline skips and counts such records).
"""

from __future__ import annotations

import numpy as np

from star_jax.models import positions as positions_lib
from star_jax.text import chat


class SequenceTooLong(ValueError):
    """An example does not fit the configured prompt length; `needed` / `limit`: its length and the limit."""

    def __init__(self, needed: int, limit: int):
        super().__init__(
            f"prompt of {needed} tokens exceeds max_prompt_len={limit}: "
            f"raise config.data.max_prompt_len to {needed} or more (--config.data.max_prompt_len={needed})"
        )
        self.needed, self.limit = needed, limit

    def __reduce__(self):  # picklable across Grain worker processes
        return type(self), (self.needed, self.limit)


def _left_pad(rows: dict[str, list], length: int, pads: dict[str, object]) -> dict[str, np.ndarray]:
    n = len(next(iter(rows.values())))
    if n > length:
        raise SequenceTooLong(n, length)
    return {k: np.asarray([pads[k]] * (length - n) + list(v)) for k, v in rows.items()}


def _one_d(start: int, n: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + n), (3, n))


def _with_padding_positions(pos: np.ndarray, pad: int) -> np.ndarray:
    return np.concatenate([np.zeros((3, pad), pos.dtype), pos], axis=1)


def bag_of_words(tok, caption: str, vocab_size: int) -> np.ndarray:
    """[V] float32 multi-hot: 1 at every token id of `caption` (word order and counts dropped), the
    labels of a caption-word image classifier (SuperClass, Huang et al. 2024)."""
    ids = np.asarray(tok.encode(caption), np.int64)
    if ids.size == 0:
        raise ValueError("empty caption")
    if ids.max() >= vocab_size:
        raise ValueError(f"caption token id {int(ids.max())} >= model.decoder.vocab_size={vocab_size}")
    out = np.zeros(vocab_size, np.float32)
    out[ids] = 1.0
    return out


def generation_example(tok, caption: str, *, max_prompt_len: int, num_image_tokens: int) -> dict[str, np.ndarray]:
    """Text-to-image example: chat prompt + <|vision_start|>; positions 1-D over prompt + image."""
    if not caption.strip():
        raise ValueError("empty caption")
    return _generation_arrays(
        tok, chat.generation_ids(tok, caption), max_prompt_len=max_prompt_len, num_image_tokens=num_image_tokens
    )


def _generation_arrays(tok, ids: list[int], *, max_prompt_len: int, num_image_tokens: int) -> dict[str, np.ndarray]:
    """The arrays of a text-to-image prompt `ids` (conditional row) with its unconditional row."""
    uncond = chat.unconditional_ids(ids, tok.special("<|fim_pad|>"))
    out = _left_pad(
        {"prompt_ids": ids, "uncond_ids": uncond, "prompt_mask": [True] * len(ids)},
        max_prompt_len,
        {"prompt_ids": tok.pad_id, "uncond_ids": tok.pad_id, "prompt_mask": False},
    )
    pos = _one_d(0, len(ids) + num_image_tokens)
    out["positions"] = _with_padding_positions(pos, max_prompt_len - len(ids)).astype(np.int32)
    out["prompt_ids"] = out["prompt_ids"].astype(np.int32)
    out["uncond_ids"] = out["uncond_ids"].astype(np.int32)
    return out


# `<|im_end|>\n<|im_start|>assistant\n<|vision_start|>`: what follows the user text in a generation prompt.
TEMPLATE_TAIL = 6


def reasoning_example(
    tok, prompt: str, answer_ids: list[int], suffix: str, *, max_prompt_len: int, num_image_tokens: int
) -> dict[str, np.ndarray]:
    """Implicit-reasoning example (STAR_SPEC section 5): the base's answer to `prompt` replaces it.

    Conditional ids = E[:k] + answer_ids + ids(suffix) + E[-6:], E = the generation prompt of
    `prompt`, k = right after `<|im_start|>user\\n` (14 with Qwen's tokenizer); `answer_ids` are the
    base's generated ids (closing <|im_end|> removed), `suffix` is appended always (the reference's
    " Ultra HD, 4K, cinematic composition"; "" for none). The unconditional row is
    `chat.unconditional_ids` of that row (same length). Arrays as `generation_example`.
    """
    if not prompt.strip():
        raise ValueError("empty prompt")
    e = chat.generation_ids(tok, prompt)
    k = user_insert_index(e, tok)
    if e[-TEMPLATE_TAIL] != tok.special("<|im_end|>"):
        raise ValueError("unexpected tokenisation of the template tail")
    suffix_ids = tok.encode(suffix) if suffix else []
    ids = e[:k] + [int(t) for t in answer_ids] + suffix_ids + e[-TEMPLATE_TAIL:]
    return _generation_arrays(tok, ids, max_prompt_len=max_prompt_len, num_image_tokens=num_image_tokens)


def user_insert_index(ids: list[int], tok) -> int:
    """Index right after `<|im_start|>user\\n` (14 with Qwen's tokenizer and the default system turn)."""
    im_start = tok.special("<|im_start|>")
    starts = [i for i, t in enumerate(ids) if t == im_start]
    if len(starts) < 2:
        raise ValueError("chat prompt has no user turn")
    user_prefix = tok.encode("<|im_start|>user\n")
    k = starts[1] + len(user_prefix)
    if ids[starts[1] : k] != user_prefix:
        raise ValueError("unexpected tokenisation of the user turn")
    return k


def editing_example(
    tok,
    instruction: str,
    *,
    max_prompt_len: int,
    num_vq_tokens: int,
    vit_grid_thw: tuple[int, int, int],
    spatial_merge_size: int,
) -> dict[str, np.ndarray]:
    """Editing example (STAR_SPEC section 4):
    E[:k] ++ [vs] ++ VQ block ++ [ve] ++ [vs] ++ ViT block ++ [ve] ++ ["\\n"] ++ E[k:],
    E = chat prompt with the instruction + <|vision_start|>; k = right after `<|im_start|>user\\n`.
    The unconditional row (STAR_SPEC section 4, corrected) is `chat.unconditional_ids(E)` with the
    same blocks inserted: every text id of E in [1 : -4] (system turn, `<|im_start|>user\\n`, the
    instruction, `<|im_end|>\\n`) becomes <|fim_pad|>, the first id and the last 4 stay, and the VQ
    and ViT blocks stay as in the conditional row. `vit_grid_thw` may be any (1, h, w) grid (the
    source's `smart_resize` grid at inference). Positions: VQ block 1-D, ViT block (t, h, w), text
    after at max + 1, target image tokens continuing 1-D.
    """
    if not instruction.strip():
        raise ValueError("empty instruction")
    e = chat.generation_ids(tok, instruction)
    k = user_insert_index(e, tok)
    vs, ve = tok.special("<|vision_start|>"), tok.special("<|vision_end|>")
    image_pad, vision_pad = tok.special("<|image_pad|>"), tok.special("<|vision_pad|>")
    t, h, w = vit_grid_thw
    n_vit = t * h * w // spatial_merge_size**2
    newline = tok.encode("\n")
    middle = [vs] + [vision_pad] * num_vq_tokens + [ve, vs] + [image_pad] * n_vit + [ve] + newline
    ids = e[:k] + middle + e[k:]
    e_uncond = chat.unconditional_ids(e, tok.special("<|fim_pad|>"))
    uncond = e_uncond[:k] + middle + e_uncond[k:]
    src = (
        [False] * k
        + [False]
        + [True] * num_vq_tokens
        + [False] * (len(middle) - 1 - num_vq_tokens)
        + [False] * (len(e) - k)
    )
    vit = (
        [False] * (k + 1 + num_vq_tokens + 2) + [True] * n_vit + [False] * (len(ids) - (k + 3 + num_vq_tokens + n_vit))
    )
    out = _left_pad(
        {"prompt_ids": ids, "uncond_ids": uncond, "prompt_mask": [True] * len(ids), "src_mask": src, "vit_mask": vit},
        max_prompt_len,
        {
            "prompt_ids": tok.pad_id,
            "uncond_ids": tok.pad_id,
            "prompt_mask": False,
            "src_mask": False,
            "vit_mask": False,
        },
    )
    segments = [
        (positions_lib.TEXT, k + 1 + num_vq_tokens + 2),
        (positions_lib.IMAGE, (t, h, w)),
        (positions_lib.TEXT, 1 + len(newline) + len(e) - k),
    ]
    prompt_pos = positions_lib.layout_positions(segments, spatial_merge_size)
    start = int(prompt_pos.max()) + 1
    pos = np.concatenate([prompt_pos, _one_d(start, num_vq_tokens)], axis=1)
    out["positions"] = _with_padding_positions(pos, max_prompt_len - len(ids)).astype(np.int32)
    for key in ("prompt_ids", "uncond_ids"):
        out[key] = out[key].astype(np.int32)
    return out


def understanding_example(
    tok,
    question: str,
    answer: str,
    *,
    max_prompt_len: int,
    vit_grid_thw: tuple[int, int, int] | None,
    spatial_merge_size: int,
    follow_ups: tuple[tuple[str, str], ...] = (),
) -> dict[str, np.ndarray]:
    """Image + question -> answer: `<|vision_start|><|image_pad|>*n<|vision_end|>question` as the user
    turn, the answer + <|im_end|> as targets. Without an image grid it is a text-only chat.

    `follow_ups` (question, answer) pairs continue the chat as later user / assistant turns about
    the same image (Qwen's multi-turn template); every answer + <|im_end|> is a target.
    """
    if not question.strip() or not answer.strip() or any(not q.strip() or not a.strip() for q, a in follow_ups):
        raise ValueError("empty question or answer")
    vs, ve = tok.special("<|vision_start|>"), tok.special("<|vision_end|>")
    image_pad, im_end = tok.special("<|image_pad|>"), tok.special("<|im_end|>")
    prompt = tok.encode(chat.chat_prompt(question))
    n_vit = 0
    if vit_grid_thw is not None:
        k = user_insert_index(prompt, tok)
        t, h, w = vit_grid_thw
        n_vit = t * h * w // spatial_merge_size**2
        prompt = prompt[:k] + [vs] + [image_pad] * n_vit + [ve] + prompt[k:]
    ids, is_reply = list(prompt), [False] * len(prompt)
    for i, (q, a) in enumerate(((question, answer), *follow_ups)):
        if i:
            turn = tok.encode(chat.follow_up_prompt(q))
            ids, is_reply = ids + turn, is_reply + [False] * len(turn)
        reply = tok.encode(a) + [im_end]
        ids, is_reply = ids + reply, is_reply + [True] * len(reply)
    # Position i predicts token i + 1: the last prompt token of a turn predicts its first answer token.
    targets = [t_ if r else -1 for t_, r in zip(ids[1:], is_reply[1:], strict=True)] + [-1]
    vit = [t_ == image_pad for t_ in ids]
    out = _left_pad(
        {"prompt_ids": ids, "prompt_mask": [True] * len(ids), "text_targets": targets, "vit_mask": vit},
        max_prompt_len,
        {"prompt_ids": tok.pad_id, "prompt_mask": False, "text_targets": -1, "vit_mask": False},
    )
    if vit_grid_thw is not None:
        first = ids.index(image_pad)
        segments = [
            (positions_lib.TEXT, first),
            (positions_lib.IMAGE, tuple(vit_grid_thw)),
            (positions_lib.TEXT, len(ids) - first - n_vit),
        ]
        pos = positions_lib.layout_positions(segments, spatial_merge_size)
    else:
        pos = _one_d(0, len(ids))
    out["positions"] = _with_padding_positions(pos, max_prompt_len - len(ids)).astype(np.int32)
    out["prompt_ids"] = out["prompt_ids"].astype(np.int32)
    out["text_targets"] = out["text_targets"].astype(np.int32)
    if vit_grid_thw is None:
        del out["vit_mask"]
    return out
