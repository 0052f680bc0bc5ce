"""Tiny random Hugging Face models saved with `save_pretrained`, built offline from configs."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Replaces HF's near-zero init with weights that give O(1) logits, so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def qwen2_config(tie: bool, **kw):
    from transformers import Qwen2Config

    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return Qwen2Config(**(base | kw))


def save_qwen2(path: str, tie: bool, seed: int = 0):
    """A random tiny Qwen2ForCausalLM saved at `path`; returns the torch model (eval mode)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = randomize_(Qwen2ForCausalLM(qwen2_config(tie)), seed).eval()
    model.save_pretrained(path)
    return model


def qwen25vl_config(tie: bool = False):
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
        window_size=56,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie,
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )


def save_qwen25vl(path: str, tie: bool = False, seed: int = 0):
    """A random tiny Qwen2_5_VLForConditionalGeneration saved at `path`; returns the torch model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = randomize_(Qwen2_5_VLForConditionalGeneration(qwen25vl_config(tie)), seed).eval()
    model.save_pretrained(path)
    return model


def qwen25vl_parts(decoder, vision, *, vocab: int | None = None, layers: int | None = None) -> tuple[dict, dict]:
    """(text_config, vision_config) kwargs of a transformers Qwen2.5-VL with the sizes of a star_jax
    config's `model.decoder` / `model.vision` blocks (vocab / layers override the decoder's)."""
    text = dict(
        vocab_size=vocab or decoder.vocab_size,
        hidden_size=decoder.hidden_size,
        intermediate_size=decoder.intermediate_size,
        num_hidden_layers=layers or decoder.num_layers,
        num_attention_heads=decoder.num_heads,
        num_key_value_heads=decoder.num_kv_heads,
        rope_scaling={"type": "mrope", "mrope_section": list(decoder.mrope_section)},
        rope_theta=decoder.rope_theta,
        rms_norm_eps=decoder.rms_eps,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    vis = dict(
        depth=vision.depth,
        hidden_size=vision.hidden_size,
        num_heads=vision.num_heads,
        intermediate_size=vision.intermediate_size,
        out_hidden_size=vision.out_hidden_size,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        fullatt_block_indexes=sorted(vision.fullatt_block_indexes),
    )
    return text, vis
