"""Qwen chat templates as text and as token ids: generation, understanding and the CFG unconditional row.

The text is exactly Qwen2.5's template with its default system turn (STAR_SPEC section 3); the id
helpers work with any tokenizer of star_jax.text.tokenizer (built-in or Hugging Face).
"""

from __future__ import annotations

import numpy as np

SYSTEM = "You are a helpful assistant."


def chat_prompt(user_text: str, system: str = SYSTEM) -> str:
    """`<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user_text}<|im_end|>\\n<|im_start|>assistant\\n`."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def follow_up_prompt(user_text: str) -> str:
    """A later user turn of the same chat, after an assistant reply's `<|im_end|>`:
    `\\n<|im_start|>user\\n{user_text}<|im_end|>\\n<|im_start|>assistant\\n` (Qwen's template)."""
    return f"\n<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def image_placeholder(num_image_tokens: int) -> str:
    """Qwen-VL's image slot in a user turn: `<|vision_start|>` + num x `<|image_pad|>` + `<|vision_end|>`."""
    return "<|vision_start|>" + "<|image_pad|>" * num_image_tokens + "<|vision_end|>"


def user_text(question: str, num_image_tokens: int = 0, *, question_first: bool = False) -> str:
    """An understanding user turn's text: the image slot (if any) before the question, or after it
    with `question_first` (data.question_first)."""
    if not num_image_tokens:
        return question
    slot = image_placeholder(num_image_tokens)
    return question + slot if question_first else slot + question


def generation_ids(tok, prompt: str, system: str = SYSTEM) -> list[int]:
    """Ids of a text-to-image prompt: the chat template + `<|vision_start|>` (image tokens follow)."""
    return tok.encode(chat_prompt(prompt, system)) + [tok.special("<|vision_start|>")]


def understanding_ids(
    tok, question: str, answer: str, *, num_image_tokens: int = 0, system: str = SYSTEM
) -> tuple[list[int], list[bool]]:
    """Ids of a question (after an image slot of `num_image_tokens` pads, if any), its answer and `<|im_end|>`.

    Returns (ids [T], loss_mask [T]): the mask is True on the answer tokens and the closing
    `<|im_end|>` (the model learns to stop), False on the prompt.
    """
    user = user_text(question, num_image_tokens)
    prompt = tok.encode(chat_prompt(user, system))
    reply = tok.encode(answer) + [tok.special("<|im_end|>")]
    return prompt + reply, [False] * len(prompt) + [True] * len(reply)


def unconditional_ids(ids, fim_pad: int):
    """The CFG unconditional row of a generation prompt (STAR_SPEC section 3).

    Positions [1:-1] become `fim_pad`, then the last 4 ids (`<|im_start|>assistant\\n<|vision_start|>`)
    are restored; same length. ids: [T] list or [..., T] int array (rows along the last axis).
    """
    arr = np.asarray(ids)
    if arr.shape[-1] < 6:
        raise ValueError(f"ids: a generation prompt has at least 6 tokens, got {arr.shape[-1]}")
    out = arr.copy()
    out[..., 1:-1] = fim_pad
    out[..., -4:] = arr[..., -4:]
    return out.tolist() if isinstance(ids, list) else out
