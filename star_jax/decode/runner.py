"""A trained STAR and its four tasks: text-to-image, editing (batched), understanding (text with
stop tokens) and implicit reasoning (the base rewrites the prompt, then the stack draws it). Codes
become pixels through the VQ decoder. Model -> decoding only: loading a workdir is
`init_sources.load_workdir` (`StarRunner(*init_sources.load_workdir(workdir, stages)[:2])`).

Inputs as the reference prepares them (STAR_SPEC sections 4-5): an edit's source goes bilinearly to
the VQ's square and, aspect kept, through the Qwen2.5-VL processor's `smart_resize` to the ViT (the
M-RoPE grid is the resized (h, w)); an understanding image likewise within the processor's bounds;
a reasoning rewrite is the base's greedy answer + `REASONING_SUFFIX`. `RunnerInputs` holds what
needs only the config (sizes, ViT inputs, prompts), so a command checks every input before the
weights load; `StarRunner` adds the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import images as image_lib
from star_jax import sequences
from star_jax.decode import generate, text
from star_jax.models import positions, star, vision, vision_preprocess, vq
from star_jax.text import chat, tokenizer

# What the reference appends to the base's answer before drawing it (STAR_SPEC section 5).
REASONING_SUFFIX = " Ultra HD, 4K, cinematic composition"


@jax.jit(static_argnums=(0, 1))
def _vq_call(method: str, graphdef, state, x):
    """`VQModel.<method>(x)` compiled once per model structure and input shape: the params are
    arguments, not constants, so a new runner over the same model (a sample grid during training,
    another checkpoint) reuses the compiled program."""
    return getattr(nnx.merge(graphdef, state), method)(x)


def vq_call(model, method: str, x):
    """`model.<method>(x)` for a VQModel, through the compiled `_vq_call`."""
    graphdef, state = nnx.split(model)
    return _vq_call(method, graphdef, state, x)


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 [.., H, W, 3]."""
    return image_lib.to_uint8(images)


def to_float(images, size: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] (or a list of any sizes) -> the VQ's input float32 [N, size, size, 3]
    in [-1, 1]: each image stretched to the square bilinearly, as the reference's VQ transform."""
    return np.stack(
        [image_lib.to_unit_range(image_lib.resize_square(img, size, resample="bilinear")) for img in images]
    )


def vit_input(
    vcfg, image_u8: np.ndarray, *, min_pixels: int, max_pixels: int, name: str = "image"
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One uint8 image [H, W, 3] -> the ViT's input as the Qwen2.5-VL processor makes it:
    `smart_resize` (aspect kept, sides multiples of patch * merge, min_pixels <= h * w <= max_pixels),
    bicubic, CLIP-normalised patches. Returns (pixels float32 [P, patch_dim], grid (1, h, w) in
    patches). `vcfg`: the ViT's config (`config.model.vision` or `model.vision_cfg`: patch_size,
    spatial_merge_size, temporal_patch_size). ValueError naming `name` when a side is below one
    merged patch."""
    factor = vcfg.patch_size * vcfg.spatial_merge_size
    image = np.asarray(image_u8)
    vision_preprocess.check_min_side(image.shape[0], image.shape[1], factor, name=name)
    pixels, grid = vision_preprocess.preprocess(
        [image],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=vcfg.patch_size,
        merge_size=vcfg.spatial_merge_size,
        temporal_patch_size=vcfg.temporal_patch_size,
    )
    return pixels, tuple(int(v) for v in grid[0])


def _groups(keys: list) -> dict:
    """key -> the indices holding it, in first-seen order (rows that can share one static batch)."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


class RunnerInputs:
    """What inference builds from a run's config alone, before any weight loads: the drawn image's
    size, the ViT inputs of images and the prompts, so that a command checks every input first.

    Resolution: `image_size` (pixels of the drawn image; VQ tokens = (image_size / the VQ's
    downsampling)^2, default `config.model.vq.image_size`); ViT pixel bounds from
    `config.data.vit_min_pixels` / `vit_max_pixels` (understanding) / `vit_edit_max_pixels` (an
    edit's source), overridable by `vit_min_pixels` / `vit_max_pixels` (both tasks; 0 = config).
    """

    def __init__(self, config, tok=None, *, image_size: int = 0, vit_min_pixels: int = 0, vit_max_pixels: int = 0):
        """tok: the tokenizer; None loads `config.data.tokenizer`. ValueError for a bad image_size."""
        self.config = config
        self.tok = tokenizer.load_tokenizer(config.data.tokenizer) if tok is None else tok
        self.vision = config.model.vision
        vq_cfg = config.model.vq
        factor = vq_cfg.image_size // vq.grid_size(vq_cfg)
        self.image_size = int(image_size or vq_cfg.image_size)
        if self.image_size <= 0 or self.image_size % factor:
            raise ValueError(
                f"image size {self.image_size}: must be a positive multiple of the VQ's downsampling {factor}"
            )
        self.vq_grid = self.image_size // factor
        self.num_tokens = self.vq_grid**2
        self.vit_min_pixels, self.vit_max_pixels = int(vit_min_pixels), int(vit_max_pixels)

    def vit_bounds(self, *, editing: bool) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the ViT input for an edit's source or an understanding image."""
        low, high = vision_preprocess.pixel_bounds(self.config.data, editing=editing)
        low, high = self.vit_min_pixels or low, self.vit_max_pixels or high
        if high < low:
            raise ValueError(f"ViT max_pixels {high} is below min_pixels {low}")
        return low, high

    def vit_inputs(self, images, *, editing: bool, names=None) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """`vit_input` of each image within the edit / understanding bounds; `names` name them in errors."""
        low, high = self.vit_bounds(editing=editing)
        names = names or [f"image {i}" for i in range(len(images))]
        return [vit_input(self.vision, img, min_pixels=low, max_pixels=high, name=n) for img, n in zip(images, names)]

    def edit_example(self, instruction: str, grid) -> dict:
        """`sequences.editing_example` of an instruction for a source of ViT grid (1, h, w)."""
        return sequences.editing_example(
            self.tok,
            instruction,
            max_prompt_len=self.config.data.max_prompt_len,
            num_vq_tokens=self.num_tokens,
            vit_grid_thw=grid,
            spatial_merge_size=self.vision.spatial_merge_size,
        )

    def check_edit(self, images, instructions: list[str], *, names=None) -> None:
        """Raises ValueError (an image below the ViT's minimum side) or SequenceTooLong (an edit
        prompt over config.data.max_prompt_len) for the inputs of `StarRunner.edit`."""
        for (_, grid), ins in zip(self.vit_inputs(images, editing=True, names=names), instructions, strict=True):
            self.edit_example(ins, grid)

    def check_prompt(self, prompt: str, *, reasoning: bool = False, suffix: str = REASONING_SUFFIX) -> None:
        """Raises SequenceTooLong (needed, limit = config.data.max_prompt_len) when `prompt` does not
        fit a text-to-image prompt, or with `reasoning` leaves no room for a rewrite + `suffix`;
        ValueError when it is empty."""
        sequences.generation_example(
            self.tok, prompt, max_prompt_len=self.config.data.max_prompt_len, num_image_tokens=self.num_tokens
        )
        if reasoning:
            self.rewrite_room(prompt, suffix)

    def rewrite_room(self, prompt: str, suffix: str) -> int:
        """Answer tokens a reasoning rewrite of `prompt` may use within config.data.max_prompt_len
        (template + suffix around it); SequenceTooLong when not even one fits."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        head = sequences.user_insert_index(chat.generation_ids(self.tok, prompt), self.tok)
        fixed = head + sequences.TEMPLATE_TAIL + (len(self.tok.encode(suffix)) if suffix else 0)
        limit = self.config.data.max_prompt_len
        if fixed + 1 > limit:
            raise sequences.SequenceTooLong(fixed + 1, limit)
        return limit - fixed

    def n_vit(self, grid) -> int:
        """ViT tokens (merged patches) of a (t, h, w) patch grid."""
        t, h, w = grid
        return t * h * w // self.vision.spatial_merge_size**2


class StarRunner(RunnerInputs):
    """Inference with a STAR model (`model.components` decide which tasks work: `understand` needs
    the base and ViT; `text_to_image` / `edit` the whole model) and the config it was trained with
    (resolution keywords: `RunnerInputs`)."""

    def __init__(self, model: star.Star, config, tok=None, **resolution):
        super().__init__(config, tok, **resolution)
        self.model = model

    # -- helpers --------------------------------------------------------------------------------
    def _stack(self, examples: list[dict]) -> dict:
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def decode_codes(self, codes) -> np.ndarray:
        """codes [n, N] -> uint8 images [n, H, W, 3] through the VQ decoder."""
        codes = jnp.asarray(codes).reshape(-1, self.vq_grid, self.vq_grid)
        return to_uint8(vq_call(self.model.vq, "decode_codes", codes))

    def _draw(self, examples: list[dict], seeds: list[int], extra: dict | None = None, vit_grid=None, **sampling):
        batch = self._stack(examples) | (extra or {}) | {"seeds": np.asarray(seeds, np.int32)}
        return generate.generate_codes(
            self.model, batch, num_tokens=self.num_tokens, vit_grid=vit_grid, **_sampling_kw(**sampling)
        )

    # -- tasks ----------------------------------------------------------------------------------
    def text_to_image(
        self, prompts: list[str], *, num: int = 1, seed: int = 0, **sampling
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [len(prompts) * num, H, W, 3] (prompt-major) and their codes [.., N].

        sampling: cfg (3.0), top_k (0), top_p (1.0), temperature (1.0), reference_numerics (False).
        Raises SequenceTooLong (a ValueError naming config.data.max_prompt_len) for a long prompt."""
        examples = [
            sequences.generation_example(
                self.tok, p, max_prompt_len=self.config.data.max_prompt_len, num_image_tokens=self.num_tokens
            )
            for p in prompts
        ]
        return self._draw_examples(examples, num=num, seed=seed, **sampling)

    def _draw_examples(self, examples, *, num: int, seed: int, **sampling):
        rows = [ex for ex in examples for _ in range(num)]
        codes = self._draw(rows, [seed + i for i in range(len(rows))], **sampling)
        return self.decode_codes(codes), np.asarray(codes)

    def edit(self, images, instructions: list[str], *, seed: int = 0, names=None, **sampling) -> np.ndarray:
        """Edits a batch: n uint8 images [H_i, W_i, 3] (any sizes) + n instructions -> uint8 images
        [n, S, S, 3] (S = image_size); `edit_codes` decoded by the VQ."""
        return self.decode_codes(self.edit_codes(images, instructions, seed=seed, names=names, **sampling))

    def edit_codes(self, images, instructions: list[str], *, seed: int = 0, names=None, **sampling) -> np.ndarray:
        """The edited images' codes [n, N] int32 for n uint8 images [H_i, W_i, 3] + n instructions.
        STAR_SPEC section 4: the source goes bilinearly to the VQ's
        square (its codes fill the VQ block) and through `smart_resize` within the edit bounds to the
        ViT; rows whose sources share a ViT grid decode together, seed + i for image i.
        `names`: how errors name image i (default "image i")."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        vit = self.vit_inputs(images, editing=True, names=names)
        src = jnp.asarray(to_float(images, self.image_size))
        src_codes = np.asarray(vq_call(self.model.vq, "encode_to_codes", src)).reshape(len(images), -1)
        out = [None] * len(images)
        for grid, idx in _groups([g for _, g in vit]).items():
            examples = [self.edit_example(instructions[i], grid) for i in idx]
            extra = {
                "src_codes": src_codes[idx].astype(np.int32),
                "pixels": np.stack([vit[i][0] for i in idx]).astype(np.float32),
            }
            codes = self._draw(examples, [seed + i for i in idx], extra, vit_grid=grid, **sampling)
            for i, row in zip(idx, np.asarray(codes)):
                out[i] = row
        return np.stack(out)

    def understand(
        self, images, questions: list[str], max_new_tokens: int = 32, *, temperature: float = 0.0, names=None
    ) -> list[str]:
        """Answers (text, without the closing <|im_end|>) to questions about images (one per question,
        any sizes: `smart_resize` within the understanding bounds) or, with images None, text alone."""
        return [
            self.tok.decode(ids).strip()
            for ids in self.answer_ids(
                images, questions, max_new_tokens=max_new_tokens, temperature=temperature, names=names
            )
        ]

    def answer_ids(
        self, images, questions: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0, names=None
    ):
        """The base's answers as token ids (closing <|im_end|> removed), one list per question."""
        for q in questions:
            if not q.strip():
                raise ValueError("empty question")
        if images is None:
            return self._answer(None, None, questions, list(range(len(questions))), max_new_tokens, temperature)
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        vit = self.vit_inputs(images, editing=False, names=names)
        out = [None] * len(questions)
        for grid, idx in _groups([g for _, g in vit]).items():
            pixels = np.stack([vit[i][0] for i in idx])
            for i, ids in zip(
                idx, self._answer(pixels, grid, [questions[i] for i in idx], idx, max_new_tokens, temperature)
            ):
                out[i] = ids
        return out

    def _answer(self, pixels, grid, questions, idx, max_new_tokens, temperature):
        n_vit = self.n_vit(grid) if grid is not None else 0
        question_first = bool(self.config.data.get("question_first", False))
        rows = [
            self.tok.encode(chat.chat_prompt(chat.user_text(q, n_vit, question_first=question_first)))
            for q in questions
        ]
        limit = self.config.data.max_prompt_len + n_vit
        for i, row in zip(idx, rows):
            if len(row) > limit:
                raise ValueError(
                    f"question {i}: {len(row)} tokens with the template and image block exceed "
                    f"config.data.max_prompt_len={self.config.data.max_prompt_len} + {n_vit} image tokens"
                )
        ids, mask = text.left_pad(rows, self.tok.pad_id)
        base = self.model.base
        embeds = base.embed(jnp.asarray(ids))
        if grid is not None:
            layout = vision.vision_layout(np.tile([grid], (len(rows), 1)), self.model.vision_cfg)
            vit_mask = jnp.asarray(ids == self.tok.special("<|image_pad|>"))
            embeds = star.fill_slots(embeds, vit_mask, self.model.vit_embeds(jnp.asarray(pixels), layout))
            pos = self._positions(ids, mask, grid)
        else:
            pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[None].repeat(3, 0)
        stop = self.tok.special("<|im_end|>")
        out = text.generate_from_embeds(
            base,
            embeds,
            mask,
            pos,
            max_new_tokens=max_new_tokens,
            stop_ids=(stop,),
            temperature=temperature,
            num_ids=self.tok.vocab_size,
        )
        return [[t for t in row if t != stop] for row in out]

    def reason_then_draw(
        self,
        prompt: str,
        *,
        suffix: str = REASONING_SUFFIX,
        max_reasoning_tokens: int = 256,
        num: int = 1,
        seed: int = 0,
        **sampling,
    ):
        """Implicit reasoning (STAR_SPEC section 5): the base answers `prompt` greedily (up to
        `max_reasoning_tokens`); its answer ids + `suffix` replace the prompt in the conditional row
        (`sequences.reasoning_example`), and the stack draws that. Returns (the rewritten text,
        images uint8 [num, H, W, 3], codes [num, N])."""
        room = self.rewrite_room(prompt, suffix)
        answer = self.answer_ids(None, [prompt], max_new_tokens=min(max_reasoning_tokens, room))[0]
        example = sequences.reasoning_example(
            self.tok,
            prompt,
            answer,
            suffix,
            max_prompt_len=self.config.data.max_prompt_len,
            num_image_tokens=self.num_tokens,
        )
        images, codes = self._draw_examples([example], num=num, seed=seed, **sampling)
        return self.tok.decode(answer) + suffix, images, codes

    def _positions(self, ids: np.ndarray, mask: np.ndarray, grid) -> np.ndarray:
        n = len(ids)
        return positions.rope_index(
            ids,
            np.asarray([grid] * n),
            image_token_id=self.tok.special("<|image_pad|>"),
            spatial_merge_size=self.vision.spatial_merge_size,
            attention_mask=mask,
        )


def _sampling_kw(
    *, cfg: float = 3.0, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, reference_numerics: bool = False
) -> dict:
    """The sampling keywords of the tasks -> `generate.generate_codes`'s (unknown names raise TypeError)."""
    return dict(
        cfg_weight=cfg, top_k=top_k, top_p=top_p, temperature=temperature, reference_numerics=reference_numerics
    )
