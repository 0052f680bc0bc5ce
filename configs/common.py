"""Shared config helpers (big_vision style): `parse_arg` for `get_config(arg)` strings, and the prompt
lengths a stage's examples need (`prompt_len_needed`, `default_max_prompt_len`)."""

from __future__ import annotations

import ml_collections

from star_jax import stages
from star_jax.models import vision_preprocess

# Qwen2.5's chat template around the user text (the built-in tokenizer's is the same length): 14 ids
# before it (default system turn + `<|im_start|>user\n`), 6 after (`<|im_end|>\n<|im_start|>assistant\n`
# + `<|vision_start|>` of a generation prompt).
CHAT_TEMPLATE_TOKENS = 20
# Text a stage's prompt holds besides the template and image blocks, by the kind of record it reads:
# pairs: a caption or an implicit-reasoning rewrite (up to 256 answer tokens + the reference's style
# suffix); qa: a question and its answer; edits: the instruction.
TEXT_BUDGET = {"pairs": 256 + 16, "qa": 256, "edits": 128}
PROMPT_LEN_MULTIPLE = 64  # defaults are rounded up to this (static shapes that tile well)
NO_PROMPT_LEN = 64  # the default of stages whose examples hold no prompt (vq) or that are not registered yet


def _coerce(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("true", "1", "yes", ""):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return type(like)(value)


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses `get_config`'s single string argument, e.g. "size=tiny,stage=generation,runlocal".

    Each keyword of `spec` is a known argument with its default; the value's type converts the
    string (a bare `runlocal` means True). With `lazy=True` unknown keys are kept as strings,
    otherwise they raise naming the key.
    """
    out = ml_collections.ConfigDict(spec)
    if not arg:
        return out
    for i, part in enumerate(arg.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if i == 0 and len(spec) >= 1 and not isinstance(next(iter(spec.values())), bool) and key not in spec:
                key, value = next(iter(spec)), key  # positional first argument: "tiny" == "size=tiny"
            else:
                value = ""
        if key not in spec:
            if not lazy:
                raise ValueError(f"config argument {key!r} is unknown; known: {sorted(spec)}")
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, spec[key])
        except ValueError as e:
            raise ValueError(f"config argument {key}={value!r}: {e}") from None
    return out


def to_list_of_pairs(rules) -> list[list]:
    """Logical rules as JSON-able lists (ConfigDict turns tuples into lists anyway)."""
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


def has_prompt(stage) -> bool:
    """Whether `stage`'s examples hold a prompt of `config.data.max_prompt_len` ids."""
    return stage.reads == "qa" or stage.image_tokens


def vit_tokens(config, stage=None) -> int:
    """ViT tokens of one image in a `stage` prompt: merged patches of the training square
    `data.vit_image_size`, or for an edit (whose inference prompt must fit the same length) of the
    larger edit budget `data.vit_edit_max_pixels` (the reference's 28 * 28 * 576 at 3b / 7b; 0 = the
    square). Understanding prompts at inference get their ViT block on top of `data.max_prompt_len`."""
    unit = config.model.vision.patch_size * config.model.vision.spatial_merge_size
    tokens = (config.data.vit_image_size // unit) ** 2
    if stage is not None and stage.reads == "edits":
        tokens = max(tokens, vision_preprocess.pixel_bounds(config.data, editing=True)[1] // unit**2)
    return tokens


def image_block_tokens(config, stage) -> int:
    """Prompt ids a `stage` example spends on its input image: the ViT block (`<|vision_start|>` +
    tokens + `<|vision_end|>`) when it uses the ViT; for an edit also the source's VQ block (+ its two
    delimiters and the newline after the blocks)."""
    n = vit_tokens(config, stage) + 2 if stage.uses_vit else 0
    if stage.reads == "edits":
        n += stages.num_image_tokens(config) + 3
    return n


def prompt_len_needed(config, stage, text_tokens: int) -> int:
    """The prompt length of a `stage` example with `text_tokens` of text (caption / question + answer /
    instruction): the chat template + the image blocks + the text."""
    return CHAT_TEMPLATE_TOKENS + image_block_tokens(config, stage) + text_tokens


def default_max_prompt_len(config, stage) -> int:
    """`data.max_prompt_len` that fits `stage`'s examples at `config`'s sizes with `TEXT_BUDGET` of text
    (an edit with its VQ and ViT blocks; a reasoning rewrite), rounded up to `PROMPT_LEN_MULTIPLE`.
    `stage` None (a project's stage, not registered yet) or without a prompt: `NO_PROMPT_LEN`."""
    if stage is None or not has_prompt(stage):
        return NO_PROMPT_LEN
    needed = prompt_len_needed(config, stage, TEXT_BUDGET.get(stage.reads, TEXT_BUDGET["qa"]))
    return -(-needed // PROMPT_LEN_MULTIPLE) * PROMPT_LEN_MULTIPLE
