"""The PyTorch reference decode loop of STAR text-to-image (STAR_SPEC section 3), for comparison only.

This is the only module that imports torch on the decode path. It rebuilds a star_jax `Star` in
transformers Qwen2 layers plus a torch pixel adapter and image head, with the *same* weights
(taken through the mapping table, `table.to_ref` on each `star_table` entry), and runs the reference's
procedure: a Python loop of exactly N steps, Hugging Face `DynamicCache`s for the base and the
stack, CFG pairs as rows 2i (conditional) / 2i + 1 (unconditional):

  h = base(x)  (final-normed)      h2 = stack(h)  (final-normed)      l = head(h2[:, -1])
  l = l_uncond + w (l_cond - l_uncond); temperature, top-k, top-p; sample (greedy at temperature 0)
  x = adapter(codebook[token]) for both rows of the pair

The stack is a `Qwen2Model` with `num_hidden_layers = stack_layers` fed `inputs_embeds = h`; its
embedding table is unused (vocab 1). Positions are 1-D (stream 0 of the batch's M-RoPE positions).
Used by `python -m star_jax.bench generate` and `tests/test_torch_reference.py`.

Editing and implicit reasoning (STAR_SPEC sections 4-5, corrected) are written from the spec in the
second half (`TorchStarVL`, `edit_codes`, `reasoning_codes`, `text_to_image_codes`): transformers'
Qwen2.5-VL text model (M-RoPE, 3-D position ids) for base and stack, its vision tower for the source,
one prompt pair at a time without padding, the sequences, unconditional rows and positions built
here. Inputs it shares with star_jax: the source's VQ codes and the processor's patches (the VQ and
`smart_resize` are checked on their own). `tests/test_reference_paths.py` compares greedy tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flax import nnx
from transformers import DynamicCache, Qwen2Config, Qwen2Model

from star_jax.convert import star_table
from star_jax.convert.hf_config import qwen2_text_config, vision_fields
from star_jax.convert.table import to_ref
from star_jax.models.star import Star
from star_jax.text import chat

# The reference tensors the decode loop uses, and where they go in `TorchStar`.
REFERENCE_PREFIXES = ("llm.model.", "stacked_ar.model.", "pixel_adapter.layers.", "pixel_output_head.")
TORCH_PREFIXES = dict(zip(REFERENCE_PREFIXES, ("base.", "stack.", "adapter.", "head.")))


def reference_state_dict(model: Star) -> dict[str, np.ndarray]:
    """The reference-named tensors (`llm.model.*`, `stacked_ar.model.*`, adapter, head) of `model`."""
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = [e for e in star_table.star_entries(model) if e.ref.startswith(REFERENCE_PREFIXES)]
    out = {}
    for entry in entries:
        for name, value in to_ref(entry, np.asarray(flat[entry.flax], np.float32)):
            out[name] = value
    return out


def _qwen2_config(cfg, num_layers: int, vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        **qwen2_text_config(cfg, num_layers=num_layers, vocab_size=vocab_size), tie_word_embeddings=False
    )


class TorchStar(torch.nn.Module):
    """base (Qwen2Model), stack (Qwen2Model, unused embedding), adapter (Linear/GELU Sequential),
    head (Linear), and the frozen codebook [K, C] float32 as a buffer."""

    def __init__(self, decoder_cfg, stack_layers: int, adapter_depth: int, codebook: np.ndarray):
        super().__init__()
        d = decoder_cfg.hidden_size
        self.base = Qwen2Model(_qwen2_config(decoder_cfg, decoder_cfg.num_layers, decoder_cfg.vocab_size))
        self.stack = Qwen2Model(_qwen2_config(decoder_cfg, stack_layers, 1))
        adapter = [torch.nn.Linear(codebook.shape[1], d)]
        for _ in range(adapter_depth - 1):
            adapter += [torch.nn.GELU(approximate="none"), torch.nn.Linear(d, d)]
        self.adapter = torch.nn.Sequential(*adapter)
        self.head = torch.nn.Linear(d, codebook.shape[0])
        self.register_buffer("codebook", torch.from_numpy(np.asarray(codebook, np.float32).copy()))

    @classmethod
    def from_star(cls, model: Star, attn_implementation: str = "sdpa") -> TorchStar:
        """The same weights as the star_jax `model` (float32, eval mode)."""
        codebook = np.asarray(model.vq.quantize.codebook(), np.float32)
        ref = cls(model.decoder_cfg, model.star_cfg.stack_layers, model.star_cfg.adapter_depth, codebook)
        tensors = reference_state_dict(model)
        state = {}
        for name, value in tensors.items():
            prefix = next(p for p in REFERENCE_PREFIXES if name.startswith(p))
            state[TORCH_PREFIXES[prefix] + name[len(prefix) :]] = torch.from_numpy(np.array(value, np.float32))
        state["stack.embed_tokens.weight"] = ref.stack.embed_tokens.weight.detach().clone()
        state["codebook"] = ref.codebook
        ref.load_state_dict(state, strict=True)
        for m in (ref.base, ref.stack):
            m.config._attn_implementation = attn_implementation
        return ref.requires_grad_(False).eval()


def set_num_threads(n: int) -> int:
    """Sets torch's intra-op threads; returns the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    cfg_weight: float = 3.0
    temperature: float = 1.0  # 0 = greedy (the reference ignores temperature; this loop honours it)
    top_k: int = 0
    top_p: float = 1.0


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k, then top-p keeping tokens whose mass strictly above them is < p (as star_jax)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample(logits: torch.Tensor, sc: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    if sc.temperature == 0.0 or sc.top_k == 1:
        return torch.argmax(logits, dim=-1)
    logits = _filter(logits / sc.temperature, sc.top_k, sc.top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate_codes(
    ref: TorchStar,
    batch: dict,
    *,
    num_tokens: int,
    sample: SampleConfig,
    seed: int = 0,
    return_logits: bool = False,
):
    """The reference loop: n prompts -> image tokens [n, N] int64 (numpy).

    batch: the star_jax generation batch (numpy): prompt_ids, uncond_ids, prompt_mask [n, Tp];
    positions [n, 3, Tp + N] (stream 0 is used: 1-D positions).
    Returns codes, and with `return_logits` also the conditional logits [n, N, K] float32.
    """
    ids = np.stack([batch["prompt_ids"], batch["uncond_ids"]], axis=1).reshape(-1, batch["prompt_ids"].shape[1])
    ids = torch.from_numpy(ids.astype(np.int64))
    mask = torch.from_numpy(np.repeat(np.asarray(batch["prompt_mask"], np.int64), 2, axis=0))
    positions = torch.from_numpy(np.repeat(np.asarray(batch["positions"])[:, 0].astype(np.int64), 2, axis=0))
    rows, tp = ids.shape
    generator = torch.Generator().manual_seed(seed)
    base_cache = DynamicCache(config=ref.base.config)
    stack_cache = DynamicCache(config=ref.stack.config)
    x = ref.base.embed_tokens(ids)
    start, tokens, cond_logits = 0, [], []
    for _ in range(num_tokens):
        pos = positions[:, start : start + x.shape[1]]
        h = ref.base(
            inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=base_cache, use_cache=True
        ).last_hidden_state
        h2 = ref.stack(
            inputs_embeds=h, attention_mask=mask, position_ids=pos, past_key_values=stack_cache, use_cache=True
        ).last_hidden_state
        logits = ref.head(h2[:, -1]).float()
        cond, uncond = logits[0::2], logits[1::2]
        guided = uncond + sample.cfg_weight * (cond - uncond)
        tok = _sample(guided, sample, generator)
        tokens.append(tok)
        if return_logits:
            cond_logits.append(cond)
        start += x.shape[1]
        x = ref.adapter(ref.codebook[tok]).repeat_interleave(2, dim=0)[:, None]
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
    codes = torch.stack(tokens, dim=1).numpy()
    return (codes, torch.stack(cond_logits, dim=1).numpy()) if return_logits else codes


# ------------------------------------------------------------------------------------------------
# Editing and implicit reasoning (STAR_SPEC sections 4-5), written from the spec: transformers'
# Qwen2.5-VL text model (M-RoPE, 3-D position ids) for the base and the stack, its vision tower for
# the source image, and the sequences assembled here, one prompt pair at a time (no padding).

SPECIAL = {"vs": "<|vision_start|>", "ve": "<|vision_end|>", "fim": "<|fim_pad|>", "im_end": "<|im_end|>"}
USER_TURN_END = 14  # index right after `<|im_start|>user\n` in a chat prompt with the default system turn


def _vl_text_config(cfg, num_layers: int, vocab_size: int):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    fields = qwen2_text_config(cfg, num_layers=num_layers, vocab_size=vocab_size)
    fields["rope_parameters"] = dict(
        rope_type="default", type="mrope", rope_theta=cfg.rope_theta, mrope_section=list(cfg.mrope_section)
    )
    fields.pop("rope_theta", None)
    return Qwen2_5_VLTextConfig(**fields, tie_word_embeddings=False)


def _vision_config(v):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    return Qwen2_5_VLVisionConfig(**vision_fields(v))


class TorchStarVL(torch.nn.Module):
    """The reference modules for editing and reasoning: base and stack as transformers
    `Qwen2_5_VLTextModel` (3-D M-RoPE positions), the ViT as `Qwen2_5_VisionTransformerPretrainedModel`,
    adapter, head, the base's text head (tied or `llm.lm_head`) and the codebook, with the same
    weights as the star_jax model (through the mapping table)."""

    def __init__(self, model: Star):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
            Qwen2_5_VLTextModel,
        )

        super().__init__()
        cfg = model.decoder_cfg
        codebook = np.asarray(model.vq.quantize.codebook(), np.float32)
        self.base = Qwen2_5_VLTextModel(_vl_text_config(cfg, cfg.num_layers, cfg.vocab_size))
        self.stack = Qwen2_5_VLTextModel(_vl_text_config(cfg, model.star_cfg.stack_layers, 1))
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(_vision_config(model.vision_cfg))
        d = cfg.hidden_size
        adapter = [torch.nn.Linear(codebook.shape[1], d)]
        for _ in range(model.star_cfg.adapter_depth - 1):
            adapter += [torch.nn.GELU(approximate="none"), torch.nn.Linear(d, d)]
        self.adapter = torch.nn.Sequential(*adapter)
        self.head = torch.nn.Linear(d, codebook.shape[0])
        self.register_buffer("codebook", torch.from_numpy(codebook.copy()))
        flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        prefixes = {**TORCH_PREFIXES, "llm.visual.": "visual.", "llm.lm_head.": "lm_head."}
        state, lm_head = {}, None
        for entry in star_table.star_entries(model):
            prefix = next((p for p in prefixes if entry.ref.startswith(p)), None)
            if prefix is None:
                continue
            for name, value in to_ref(entry, np.asarray(flat[entry.flax], np.float32)):
                tensor = torch.from_numpy(np.array(value, np.float32))
                if prefix == "llm.lm_head.":
                    lm_head = tensor
                else:
                    state[prefixes[prefix] + name[len(prefix) :]] = tensor
        state["stack.embed_tokens.weight"] = self.stack.embed_tokens.weight.detach().clone()
        state["codebook"] = self.codebook
        self.load_state_dict(state, strict=True)
        self.register_buffer("lm_head", lm_head if lm_head is not None else state["base.embed_tokens.weight"])
        for m in (self.base, self.stack):
            m.config._attn_implementation = "sdpa"
        self.visual.config._attn_implementation = "sdpa"
        self.requires_grad_(False).eval()


def _spec_positions(segments: list[tuple[str, object]], merge: int) -> np.ndarray:
    """[3, T] M-RoPE positions of text / ViT segments (STAR_SPEC section 4): text 1-D from the running
    index, a ViT block (t, h, w) over its merged grid offset by the running index, the next text at
    max + 1."""
    out, nxt = [], 0
    for kind, size in segments:
        if kind == "text":
            out.append(np.broadcast_to(np.arange(nxt, nxt + size), (3, size)))
            nxt += size
        else:
            t, h, w = size
            gh, gw = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + nxt
            out.append(block)
            nxt = int(block.max()) + 1
    return np.concatenate(out, axis=1)


def unconditional(ids: list[int], fim: int) -> list[int]:
    """STAR_SPEC section 3: [1:-1] -> <|fim_pad|>, then the last 4 ids restored."""
    return ids[:1] + [fim] * (len(ids) - 5) + ids[-4:]


@torch.inference_mode()
def decode_pair(ref: TorchStarVL, embeds: torch.Tensor, positions: np.ndarray, num_tokens: int, sample):
    """The section-3 loop on one CFG pair: embeds [2, T, D] (cond, uncond), positions [3, T]
    (same in both rows); generated tokens continue 1-D at max + 1. Returns codes [N] (numpy)."""
    base_cache, stack_cache = DynamicCache(config=ref.base.config), DynamicCache(config=ref.stack.config)
    pos = torch.from_numpy(np.repeat(positions[:, None].astype(np.int64), 2, axis=1))
    nxt, x, tokens = int(positions.max()) + 1, embeds, []
    generator = torch.Generator().manual_seed(0)
    for _ in range(num_tokens):
        h = ref.base(inputs_embeds=x, position_ids=pos, past_key_values=base_cache, use_cache=True).last_hidden_state
        h2 = ref.stack(inputs_embeds=h, position_ids=pos, past_key_values=stack_cache, use_cache=True).last_hidden_state
        logits = ref.head(h2[:, -1]).float()
        guided = logits[1:] + sample.cfg_weight * (logits[:1] - logits[1:])
        tok = _sample(guided, sample, generator)
        tokens.append(int(tok[0]))
        x = ref.adapter(ref.codebook[tok]).repeat(2, 1)[:, None]
        pos = torch.full((3, 2, 1), nxt, dtype=torch.int64)
        nxt += 1
    return np.asarray(tokens)


@torch.inference_mode()
def edit_codes(
    ref: TorchStarVL, tok, instruction: str, src_codes, pixels, grid_thw, *, num_tokens: int, sample: SampleConfig
) -> np.ndarray:
    """Editing (STAR_SPEC section 4) of one source: its VQ codes [N_src], processor patches
    [P, patch_dim] of ViT grid (1, h, w), the instruction -> the edited image's codes [N]."""
    sp = {k: tok.special(v) for k, v in SPECIAL.items()}
    e = tok.encode(chat.chat_prompt(instruction)) + [sp["vs"]]
    k = USER_TURN_END
    merge = ref.visual.config.spatial_merge_size
    vit = ref.visual(torch.from_numpy(np.asarray(pixels, np.float32)), grid_thw=torch.tensor([list(grid_thw)]))
    vit = getattr(vit, "pooler_output", vit)
    src = ref.adapter(ref.codebook[torch.from_numpy(np.asarray(src_codes, np.int64))])
    emb = lambda ids: ref.base.embed_tokens(torch.tensor(ids, dtype=torch.int64))
    newline = tok.encode("\n")

    def row(ids):
        return torch.cat(
            [emb(ids[:k] + [sp["vs"]]), src, emb([sp["ve"], sp["vs"]]), vit, emb([sp["ve"]] + newline + ids[k:])]
        )

    embeds = torch.stack([row(e), row(unconditional(e, sp["fim"]))])
    n_text = k + 1 + len(src) + 2
    positions = _spec_positions(
        [("text", n_text), ("vit", tuple(grid_thw)), ("text", 1 + len(newline) + len(e) - k)], merge
    )
    return decode_pair(ref, embeds, positions, num_tokens, sample)


@torch.inference_mode()
def reasoning_codes(
    ref: TorchStarVL,
    tok,
    prompt: str,
    *,
    suffix: str,
    num_tokens: int,
    sample: SampleConfig,
    max_answer_tokens: int = 256,
    num_ids: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Implicit reasoning (STAR_SPEC section 5): the base answers `prompt` greedily (at most
    `max_answer_tokens`, stopping at <|im_end|>; only ids below `num_ids` drawn when given, as a
    tokenizer smaller than the table needs), then the conditional row is template head [:14] +
    answer + suffix + template tail [-6:] and the image is drawn. Returns (answer ids, codes [N])."""
    sp = {k: tok.special(v) for k, v in SPECIAL.items()}
    ids = tok.encode(chat.chat_prompt(prompt))
    cache, x, answer = DynamicCache(config=ref.base.config), torch.tensor([ids]), []
    pos = torch.arange(len(ids))[None, None].repeat(3, 1, 1)
    for _ in range(max_answer_tokens):
        h = ref.base(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
        logits = h[0, -1] @ ref.lm_head.T
        if num_ids is not None:
            logits[num_ids:] = float("-inf")
        t = int(torch.argmax(logits))
        if t == sp["im_end"]:
            break
        answer.append(t)
        x, pos = torch.tensor([[t]]), torch.full((3, 1, 1), int(pos.max()) + 1)
    e = tok.encode(chat.chat_prompt(prompt)) + [sp["vs"]]
    cond = e[:USER_TURN_END] + answer + (tok.encode(suffix) if suffix else []) + e[-6:]
    rows = torch.tensor([cond, unconditional(cond, sp["fim"])])
    embeds = ref.base.embed_tokens(rows)
    positions = np.broadcast_to(np.arange(len(cond)), (3, len(cond)))
    return answer, decode_pair(ref, embeds, positions, num_tokens, sample)


@torch.inference_mode()
def text_to_image_codes(ref: TorchStarVL, tok, prompt: str, *, num_tokens: int, sample: SampleConfig) -> np.ndarray:
    """Text-to-image (STAR_SPEC section 3) of one prompt through the section-4 modules: the chat
    prompt + <|vision_start|> and its unconditional row, 1-D positions -> codes [N]."""
    ids = tok.encode(chat.chat_prompt(prompt)) + [tok.special(SPECIAL["vs"])]
    rows = torch.tensor([ids, unconditional(ids, tok.special(SPECIAL["fim"]))])
    positions = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    return decode_pair(ref, ref.base.embed_tokens(rows), positions, num_tokens, sample)
