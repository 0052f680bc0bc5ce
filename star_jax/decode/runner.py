"""A trained STAR and its four tasks: text-to-image, editing (batched), understanding (text with
stop tokens) and implicit reasoning (the base rewrites the prompt, then the stack draws it). Codes
become pixels through the VQ decoder. Model -> decoding only: loading a workdir is
`init_sources.load_workdir` (`StarRunner(*init_sources.load_workdir(workdir, stages)[:2])`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import sequences
from star_jax.decode import generate, text
from star_jax.models import positions, star, vision, vision_preprocess, vq
from star_jax.text import chat, tokenizer


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
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def to_float(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] (any size) -> float32 [N, size, size, 3] in [-1, 1] (bicubic resize)."""
    from PIL import Image

    out = []
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"image of shape {img.shape}: expected [H, W, 3] RGB")
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
        out.append(img.astype(np.float32) / 127.5 - 1.0)
    return np.stack(out)


def vit_inputs(model: star.Star, config, images_u8: np.ndarray):
    """The ViT's inputs for uint8 images [B, H, W, 3] (any size; resized to data.vit_image_size):
    (pixels float32 [B, P, patch_dim], grid_thw of one image, the batch's static `vision.VisionLayout`)."""
    vcfg = model.vision_cfg
    size = config.data.vit_image_size
    resized = [np.asarray(to_uint8(x)) for x in to_float(images_u8, size)]
    pixels, grid = vision_preprocess.preprocess(
        resized,
        min_pixels=size * size,
        max_pixels=size * size,
        patch_size=vcfg.patch_size,
        merge_size=vcfg.spatial_merge_size,
        temporal_patch_size=vcfg.temporal_patch_size,
    )
    grid = tuple(int(v) for v in grid[0])
    layout = vision.vit_layout(vcfg, size, len(images_u8))
    return pixels.reshape(len(images_u8), -1, pixels.shape[-1]), grid, layout


class StarRunner:
    """Inference with a STAR model (`model.components` decide which tasks work: `understand` needs
    the base and ViT; `text_to_image` / `edit` the whole model) and the config it was trained with."""

    def __init__(self, model: star.Star, config, tok=None):
        """tok: the tokenizer; None loads `config.data.tokenizer`."""
        tok = tokenizer.load_tokenizer(config.data.tokenizer) if tok is None else tok
        self.model, self.config, self.tok = model, config, tok
        self.vq_grid = vq.grid_size(config.model.vq)
        self.num_tokens = self.vq_grid**2

    # -- helpers --------------------------------------------------------------------------------
    def _stack(self, examples: list[dict]) -> dict:
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _vit_inputs(self, images_u8: np.ndarray):
        return vit_inputs(self.model, self.config, images_u8)

    def decode_codes(self, codes) -> np.ndarray:
        """codes [n, N] -> uint8 images [n, H, W, 3] through the VQ decoder."""
        codes = jnp.asarray(codes).reshape(-1, self.vq_grid, self.vq_grid)
        return to_uint8(vq_call(self.model.vq, "decode_codes", codes))

    # -- tasks ----------------------------------------------------------------------------------
    def text_to_image(
        self,
        prompts: list[str],
        *,
        num: int = 1,
        cfg: float = 3.0,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [len(prompts) * num, H, W, 3] (prompt-major) and their codes [.., N]."""
        examples, seeds = [], []
        for p_i, prompt in enumerate(prompts):
            ex = sequences.generation_example(
                self.tok, prompt, max_prompt_len=self.config.data.max_prompt_len, num_image_tokens=self.num_tokens
            )
            for k in range(num):
                examples.append(ex)
                seeds.append(seed + p_i * num + k)
        batch = self._stack(examples) | {"seeds": np.asarray(seeds, np.int32)}
        codes = generate.generate_codes(
            self.model,
            batch,
            num_tokens=self.num_tokens,
            cfg_weight=cfg,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        return self.decode_codes(codes), np.asarray(codes)

    def edit(
        self,
        images: np.ndarray,
        instructions: list[str],
        *,
        cfg: float = 3.0,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> np.ndarray:
        """Edits a batch: uint8 images [n, H, W, 3] + n instructions -> uint8 images [n, H', W', 3]."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        vq_size = self.config.model.vq.image_size
        src = jnp.asarray(to_float(images, vq_size))
        src_codes = np.asarray(vq_call(self.model.vq, "encode_to_codes", src)).reshape(len(images), -1)
        pixels, grid, layout = self._vit_inputs(images)
        examples = [
            sequences.editing_example(
                self.tok,
                ins,
                max_prompt_len=self.config.data.max_prompt_len,
                num_vq_tokens=self.num_tokens,
                vit_grid_thw=grid,
                spatial_merge_size=self.model.vision_cfg.spatial_merge_size,
            )
            for ins in instructions
        ]
        batch = self._stack(examples) | {
            "src_codes": src_codes.astype(np.int32),
            "pixels": pixels.astype(np.float32),
            "seeds": np.arange(seed, seed + len(images), dtype=np.int32),
        }
        codes = generate.generate_codes(
            self.model,
            batch,
            num_tokens=self.num_tokens,
            cfg_weight=cfg,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            vit_grid=grid,
        )
        return self.decode_codes(codes)

    def understand(
        self, images: np.ndarray | None, questions: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0
    ) -> list[str]:
        """Answers (text, without the closing <|im_end|>) to questions about images (or text alone)."""
        examples, vit = [], None
        if images is not None:
            pixels, grid, layout = self._vit_inputs(images)
            vit = (pixels, layout)
        for q in questions:
            if not q.strip():
                raise ValueError("empty question")
            n_vit = self._n_vit(grid) if images is not None else 0
            user = chat.user_text(q, n_vit, question_first=bool(self.config.data.get("question_first", False)))
            ids = self.tok.encode(chat.chat_prompt(user))
            examples.append(ids)
        ids, mask = text.left_pad(examples, self.tok.pad_id)
        if len(ids[0]) > self.config.data.max_prompt_len + (self._n_vit(grid) if images is not None else 0):
            raise ValueError(f"question of {len(ids[0])} tokens is longer than the context")
        base = self.model.base
        embeds = base.embed(jnp.asarray(ids))
        pad = self.tok.special("<|image_pad|>")
        if vit is not None:
            vit_mask = jnp.asarray(ids == pad)
            embeds = star.fill_slots(embeds, vit_mask, self.model.vit_embeds(jnp.asarray(vit[0]), vit[1]))
            positions = self._positions(ids, mask, grid)
        else:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[None].repeat(3, 0)
        out = text.generate_from_embeds(
            base,
            embeds,
            mask,
            positions,
            max_new_tokens=max_new_tokens,
            stop_ids=(self.tok.special("<|im_end|>"),),
            temperature=temperature,
            num_ids=self.tok.vocab_size,
        )
        stop = self.tok.special("<|im_end|>")
        return [self.tok.decode([t for t in row if t != stop]).strip() for row in out]

    def reason_then_draw(self, prompt: str, *, style: str = "", max_reasoning_tokens: int = 256, **kw):
        """Implicit reasoning (STAR_SPEC section 5): the base answers the prompt as text (greedy),
        the answer (+ style suffix) replaces the prompt of the conditional row, the stack draws it."""
        rewritten = self.understand(None, [prompt], max_new_tokens=max_reasoning_tokens)[0]
        rewritten = (rewritten or prompt) + style
        images, codes = self.text_to_image([rewritten], **kw)
        return rewritten, images, codes

    def _n_vit(self, grid) -> int:
        t, h, w = grid
        return t * h * w // self.model.vision_cfg.spatial_merge_size**2

    def _positions(self, ids: np.ndarray, mask: np.ndarray, grid) -> np.ndarray:
        n = len(ids)
        return positions.rope_index(
            ids,
            np.asarray([grid] * n),
            image_token_id=self.tok.special("<|image_pad|>"),
            spatial_merge_size=self.model.vision_cfg.spatial_merge_size,
            attention_mask=mask,
        )
