"""The generation-stage training step written in PyTorch + transformers Qwen2 modules, for comparison.

What a user would otherwise write: `torch_reference.TorchStar` (base and stack as transformers
`Qwen2Model`s, a Linear / GELU pixel adapter, a Linear image head, the frozen codebook) holding
the *same* weights as a star_jax `Star`, with the base frozen (no gradients for its weights, but
activations still backpropagate through it into the adapter) and the stack, adapter and head
trained by `torch.optim.AdamW` after global-norm clipping: the star_jax generation stage's recipe.

One step, for a batch of the star_jax generation layout (numpy: prompt_ids, uncond_ids,
prompt_mask [B, Tp], positions [B, 3, Tp + N] with stream 0 used as 1-D positions, codes [B, N]):

  ids = uncond_ids on a caption_dropout fraction of rows, else prompt_ids
  x = [base.embed(ids); adapter(codebook[codes[:, :-1]])]     h = base(x)     h2 = stack(h)
  loss = CE(head(h2[:, Tp - 1:]), codes)                        AdamW on stack, adapter, head

Compute dtype: float32, or bfloat16 through `torch.autocast` (params and optimizer state stay
float32), as star_jax's bf16 compute with f32 params. Used by `python -m star_jax.bench train`
and tests/test_bench.py.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from star_jax.bench.torch_reference import TorchStar
from star_jax.models.star import Star

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


def trainable_generation_model(model: Star) -> TorchStar:
    """`TorchStar.from_star(model)` set up for training: base, codebook and the stack's unused
    token table frozen; stack layers and final norm, adapter and head trainable; train mode
    (no dropout in Qwen2 layers at their default attention dropout 0)."""
    ref = TorchStar.from_star(model)
    ref.train()
    for module in (ref.stack, ref.adapter, ref.head):
        module.requires_grad_(True)
    ref.stack.embed_tokens.requires_grad_(False)
    return ref


def trainable_parameters(ref: TorchStar) -> list[torch.nn.Parameter]:
    """The parameters the step updates (those with requires_grad)."""
    return [p for p in ref.parameters() if p.requires_grad]


def make_optimizer(ref: TorchStar, train_cfg) -> torch.optim.AdamW:
    """AdamW over the trainable params with `config.train`'s lr, betas, eps and weight decay;
    decay only on matrices (as star_jax's mask). The learning rate is held at `lr` (no schedule:
    the benchmark times steps, it does not train to convergence)."""
    params = trainable_parameters(ref)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(train_cfg.weight_decay)},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=float(train_cfg.lr),
        betas=(float(train_cfg.b1), float(train_cfg.b2)),
        eps=float(train_cfg.get("eps", 1e-8)),
    )


def to_torch_batch(batch: dict) -> dict[str, torch.Tensor]:
    """The numpy generation batch as int64 / bool tensors (1-D positions: stream 0)."""
    return {
        "prompt_ids": torch.from_numpy(np.asarray(batch["prompt_ids"], np.int64)),
        "uncond_ids": torch.from_numpy(np.asarray(batch["uncond_ids"], np.int64)),
        "prompt_mask": torch.from_numpy(np.asarray(batch["prompt_mask"], bool)),
        "positions": torch.from_numpy(np.asarray(batch["positions"])[:, 0].astype(np.int64)),
        "codes": torch.from_numpy(np.asarray(batch["codes"], np.int64)),
    }


def image_token_loss(
    ref: TorchStar, batch: dict[str, torch.Tensor], *, caption_dropout: float, generator: torch.Generator
) -> torch.Tensor:
    """Mean CE over the codebook on every image token (float32 scalar), teacher forcing.

    batch: `to_torch_batch` of prompt_ids / uncond_ids / prompt_mask [B, Tp], positions [B, Tp + N],
    codes [B, N]. Rows drawn with probability `caption_dropout` use their unconditional prompt.
    """
    ids, codes = batch["prompt_ids"], batch["codes"]
    if caption_dropout > 0:
        dropped = torch.rand(ids.shape[0], generator=generator) < caption_dropout
        ids = torch.where(dropped[:, None], batch["uncond_ids"], ids)
    b, tp = ids.shape
    n = codes.shape[1]
    prompt = ref.base.embed_tokens(ids)
    images = ref.adapter(ref.codebook[codes[:, :-1]])
    x = torch.cat([prompt, images.to(prompt.dtype)], dim=1)
    mask = torch.cat([batch["prompt_mask"].long(), torch.ones((b, n - 1), dtype=torch.long)], dim=1)
    positions = batch["positions"][:, : tp + n - 1]
    h = ref.base(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    h2 = ref.stack(inputs_embeds=h, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    logits = ref.head(h2[:, tp - 1 :]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))


class TrainStep:
    """One generation training step in PyTorch: forward, backward, clip, AdamW. Call with a
    `to_torch_batch` batch; returns the loss (float) before the update."""

    def __init__(self, ref: TorchStar, train_cfg, *, dtype: str, caption_dropout: float, seed: int = 0):
        if dtype not in AUTOCAST:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(AUTOCAST)}")
        self.ref = ref
        self.params = trainable_parameters(ref)
        self.optimizer = make_optimizer(ref, train_cfg)
        self.clip_norm = float(train_cfg.clip_norm or 0.0)
        self.dtype = dtype
        self.caption_dropout = caption_dropout
        self.generator = torch.Generator().manual_seed(seed)

    def _autocast(self):
        if AUTOCAST[self.dtype] is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=AUTOCAST[self.dtype])

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = image_token_loss(self.ref, batch, caption_dropout=self.caption_dropout, generator=self.generator)
        loss.backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        return float(loss.detach())
