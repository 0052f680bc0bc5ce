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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flax import nnx
from transformers import DynamicCache, Qwen2Config, Qwen2Model

from star_jax.convert import star_table
from star_jax.convert.hf_config import qwen2_text_config
from star_jax.convert.table import to_ref
from star_jax.models.star import Star

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
