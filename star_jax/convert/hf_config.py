"""Hugging Face `config.json`, read and written: Qwen2 / Qwen2.5-VL configs <-> star_jax model configs.

Reading accepts both shapes (STAR_SPEC section 8): the published checkpoints' (text keys at the top
level, `rope_theta`, `rope_scaling: {type: mrope, mrope_section}`, `vision_config` with `in_chans`)
and the one transformers >= 5 writes (`text_config` nested, `rope_parameters`). Writing produces
the transformers 5 shape. `check_hf_config` names every field where a directory disagrees with the
star_jax config: values that tensor shapes cannot catch (RoPE theta and sections, eps, window, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from star_jax.convert.table import CheckpointError
from star_jax.models import qwen2, vision
from star_jax.text.tokenizer import BuiltinTokenizer

# transformers' Qwen2_5_VLVisionConfig defaults, for keys a config.json leaves out.
_HF_VISION_DEFAULTS = dict(
    depth=32,
    hidden_size=3584,
    num_heads=16,
    intermediate_size=3420,
    out_hidden_size=3584,
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)
QWEN_IMAGE_TOKEN_ID = 151655  # <|image_pad|>
QWEN_SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
QWEN_SPECIAL_IDS["vision_end_token_id"] = 151653

DECODER_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
DECODER_FIELDS += ("intermediate_size", "rope_theta", "mrope_section", "mrope_interleaved", "rms_eps")
DECODER_FIELDS += ("tie_embeddings",)
VISION_FIELDS = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size")
VISION_FIELDS += ("temporal_patch_size", "in_channels", "spatial_merge_size", "window_size", "fullatt_block_indexes")


# -- reading ----------------------------------------------------------------------------------------


def read_config(path: str) -> dict:
    """The parsed config.json of a Hugging Face model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _rope(hf: Mapping) -> dict:
    text = dict(hf.get("text_config") or hf)
    return dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})


def decoder_config_from_hf(hf: Mapping, **overrides) -> qwen2.DecoderConfig:
    """A DecoderConfig from a Qwen2 / Qwen2.5-VL config.json dict (either shape)."""
    text = dict(hf.get("text_config") or hf)
    rope = _rope(hf)
    theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 10000.0)))
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    mrope = rope.get("mrope_section")
    if mrope is None:  # plain Qwen2: 1-D RoPE; any split of the frequencies is equivalent
        half = head_dim // 2
        mrope = (half, 0, 0)
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return qwen2.DecoderConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=text["intermediate_size"],
        rope_theta=float(theta),
        mrope_section=tuple(mrope),
        rms_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(tie),
        **overrides,
    )


def vision_config_from_hf(hf_config: Mapping, **overrides) -> vision.VisionConfig:
    """A VisionConfig from a Qwen2.5-VL config.json dict (its `vision_config`; published or v5 shape)."""
    v = dict(hf_config.get("vision_config") or {})
    if not v:
        raise CheckpointError("config.json has no vision_config (not a Qwen2.5-VL checkpoint)")
    act = v.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"vision_config.hidden_act={act!r}: only 'silu' (Qwen2.5-VL) is supported")
    if "in_chans" in v:  # the published checkpoints' name
        v.setdefault("in_channels", v["in_chans"])
    rope = v.get("rope_parameters") or {}
    fields = {k: v.get(k, default) for k, default in _HF_VISION_DEFAULTS.items()}
    return vision.VisionConfig(
        **fields,
        rms_eps=1e-6,  # transformers hard-codes the vision norms' eps
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        **overrides,
    )


def _same(field: str, ours, theirs) -> bool:
    if field == "fullatt_block_indexes":  # a set of block indexes: the order is not meaningful
        return sorted(np.atleast_1d(ours).tolist()) == sorted(np.atleast_1d(theirs).tolist())
    return tuple(np.atleast_1d(ours).tolist()) == tuple(np.atleast_1d(theirs).tolist())


def config_mismatches(
    hf_json: Mapping, decoder: qwen2.DecoderConfig | None, vision_cfg: vision.VisionConfig | None
) -> list[tuple[str, object, object]]:
    """(field, ours, theirs) for every field where `hf_json` disagrees with the given configs; the
    decoder's `mrope_section` only when the directory has one (a plain Qwen2 has 1-D RoPE), the
    vision fields only when it has a `vision_config`."""
    wrong = []
    if decoder is not None:
        theirs = decoder_config_from_hf(hf_json)
        fields = [f for f in DECODER_FIELDS if f != "mrope_section" or "mrope_section" in _rope(hf_json)]
        wrong += [(f, getattr(decoder, f), getattr(theirs, f)) for f in fields]
    if vision_cfg is not None and hf_json.get("vision_config"):
        theirs = vision_config_from_hf(hf_json)
        wrong += [(f"vision.{f}", getattr(vision_cfg, f), getattr(theirs, f)) for f in VISION_FIELDS]
    return [(f, a, b) for f, a, b in wrong if not _same(f.removeprefix("vision."), a, b)]


def check_hf_config(
    hf_dir: str, decoder: qwen2.DecoderConfig | None = None, vision_cfg: vision.VisionConfig | None = None
) -> None:
    """Raises one CheckpointError (a ValueError) naming every field where `hf_dir/config.json`
    (either shape) disagrees with `decoder` / `vision_cfg` (see `config_mismatches`)."""
    wrong = config_mismatches(read_config(hf_dir), decoder, vision_cfg)
    if wrong:
        shown = "; ".join(f"{f}: config {a!r}, {hf_dir} {b!r}" for f, a, b in wrong)
        raise CheckpointError(f"{hf_dir}/config.json does not match the star_jax config: {shown}")


def check_star_config(config, hf_dir: str) -> None:
    """`check_hf_config` against a star_jax config's `model.decoder` (and `model.vision` if present)."""
    decoder = qwen2.DecoderConfig.from_dict(config.model.decoder)
    vision_cfg = vision.VisionConfig.from_dict(config.model.vision) if "vision" in config.model else None
    check_hf_config(hf_dir, decoder, vision_cfg)


# -- writing ----------------------------------------------------------------------------------------


def qwen2_text_config(d: qwen2.DecoderConfig, *, num_layers: int | None = None, vocab_size: int | None = None) -> dict:
    """The Hugging Face Qwen2 text-config fields of decoder config `d` (rope as 1-D `default`);
    `num_layers` / `vocab_size` override d's (e.g. the stack: its own depth, no vocabulary)."""
    n = d.num_layers if num_layers is None else num_layers
    return dict(
        hidden_act="silu",
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        rms_norm_eps=d.rms_eps,
        vocab_size=d.vocab_size if vocab_size is None else vocab_size,
        max_position_embeddings=32768,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        layer_types=["full_attention"] * n,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=float(d.rope_theta)),
    )


def special_ids(vocab_size: int) -> dict:
    """Qwen's image / video / vision start-end token ids, or the built-in tokenizer's for a small vocabulary."""
    if vocab_size > max(QWEN_SPECIAL_IDS.values()):
        return dict(QWEN_SPECIAL_IDS)
    tok = BuiltinTokenizer()  # the shapes world's small vocabulary
    names = dict(image_token_id="<|image_pad|>", video_token_id="<|vision_pad|>")
    names |= dict(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return {k: tok.special(v) for k, v in names.items()}


def vision_fields(v: vision.VisionConfig) -> dict:
    """The Qwen2.5-VL vision_config fields of `v` (shapes, windows, activation), as transformers names them."""
    return dict(
        depth=v.depth,
        hidden_size=v.hidden_size,
        num_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        out_hidden_size=v.out_hidden_size,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        in_channels=v.in_channels,
        spatial_merge_size=v.spatial_merge_size,
        window_size=v.window_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes),
        hidden_act="silu",
    )


def hf_config(config, *, with_vision: bool, dtype: str) -> dict:
    """config.json in the shape transformers 5 writes for Qwen2.5-VL (or Qwen2 without vision)."""
    d = qwen2.DecoderConfig.from_dict(config.model.decoder)
    text = qwen2_text_config(d)
    common = dict(dtype=dtype, tie_word_embeddings=d.tie_embeddings, transformers_version="5.23.0")
    if not with_vision:
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **text, **common)
    if d.mrope_interleaved:
        raise ValueError(
            "config.model.decoder.mrope_interleaved=True: Qwen2.5-VL has only contiguous M-RoPE sections, "
            "so its transformers model would rotate image positions differently; export with_vision=False "
            "(text-only positions are the same in both layouts) or train with mrope_interleaved=False"
        )
    v = vision.VisionConfig.from_dict(config.model.vision)
    text |= dict(
        model_type="qwen2_5_vl_text",
        rope_parameters=dict(
            rope_type="default", type="mrope", rope_theta=d.rope_theta, mrope_section=list(d.mrope_section)
        ),
    )
    vis = dict(
        model_type="qwen2_5_vl_vision",
        **vision_fields(v),
        tokens_per_second=4,
        rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
    )
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        text_config=text,
        vision_config=vis,
        **special_ids(d.vocab_size),
        **common,
    )
