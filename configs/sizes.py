"""The one size table: a size name resolves to the base decoder, ViT, stack, adapter and VQ sizes.

`tiny` is for tests, `shapes` for the CPU demo, `ladder_*` a scaling ladder for sweeps, and
`3b` / `7b` are exactly the published STAR models (STAR_SPEC section 1-2). Keys of each block are
the fields of the model dataclasses (`DecoderConfig`, `VisionConfig`, `VQConfig`, `StarConfig`).
"""

import copy

# Qwen2.5 tokenizer vocabulary; the shapes world uses its own small built-in tokenizer.
QWEN_VOCAB_3B = 151936
QWEN_VOCAB_7B = 152064
SHAPES_VOCAB = 512


def _decoder(
    hidden, layers, heads, kv_heads, ffn, vocab, *, head_dim=None, tie=False, mrope=None, theta=1e6, interleaved=False
):
    head_dim = head_dim or hidden // heads
    if mrope is None:  # Qwen's split of head_dim / 2 rotary pairs: 1/4 temporal, 3/8 height, 3/8 width.
        half = head_dim // 2
        mrope = (half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ffn,
        rope_theta=theta,
        mrope_section=tuple(mrope),
        mrope_interleaved=interleaved,
        rms_eps=1e-6,
        tie_embeddings=tie,
    )


def _vision(depth, hidden, heads, ffn, out_hidden, *, patch=14, window=112, fullatt=None, merge=2):
    return dict(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=ffn,
        out_hidden_size=out_hidden,
        patch_size=patch,
        temporal_patch_size=2,
        in_channels=3,
        spatial_merge_size=merge,
        window_size=window,
        fullatt_block_indexes=tuple(sorted(fullatt if fullatt is not None else range(depth - 1, -1, -8))),
        rms_eps=1e-6,
    )


def _vq(image_size, ch, ch_mult, z, codebook_size, codebook_dim, *, res_blocks=2, heads=8, groups=32, patch=1):
    return dict(
        image_size=image_size,
        in_channels=3,
        patch_size=patch,
        ch=ch,
        ch_mult=tuple(ch_mult),
        z_channels=z,
        num_res_blocks=res_blocks,
        attn_heads=heads,
        norm_groups=groups,
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
    )


STAR_VQ = _vq(384, 256, (1, 2, 2, 4, 8), 512, 65536, 512)

SIZES = {
    "tiny": dict(
        decoder=_decoder(64, 4, 4, 2, 128, 256, tie=True),
        vision=_vision(2, 32, 2, 64, 64, patch=14, window=56, fullatt=(1,)),
        star=dict(stack_layers=2, adapter_depth=2),
        vq=_vq(32, 16, (1, 2, 2), 16, 64, 8, res_blocks=1, heads=2, groups=8),
    ),
    "shapes": dict(
        decoder=_decoder(256, 6, 4, 2, 768, SHAPES_VOCAB, tie=True),
        vision=_vision(4, 128, 4, 384, 256, patch=8, window=32, fullatt=(1, 3)),
        star=dict(stack_layers=4, adapter_depth=2),
        # 8 x 8 pixel patches into one level of convs on the 8 x 8 code grid: on this CPU it reaches
        # 28 dB in minutes, where a 4-level conv pyramid at 64 px plateaus near 22 dB (issue 3's sweep).
        # A local encoder (1 x 1 convs, per-position norms, no attention) whose conv_in sees one
        # neighbouring patch per side: a code depends on its 3 x 3 neighbourhood only, so an edit
        # keeps 79 % of the codes of the cells it leaves unchanged (29 % with the reference-style
        # encoder, whose attention and GroupNorm statistics span the image) and tokens carry 6.1 bits
        # instead of 9.5. Width 128 with two res blocks: in the demo's 1,200 steps its ceiling is
        # 0.69 at 30.0 dB, against 0.35 at 29.4 dB for the reference-style encoder at width 64.
        # The usage window spans 16 batches of 16 images: with one batch (the default K + 1 slots)
        # half the live codes look dead, and re-seeding would move them.
        vq=_vq(64, 128, (1,), 64, 1024, 32, res_blocks=2, heads=4, groups=32, patch=8)
        | {"usage_window": 16384, "local_encoder": True, "local_context": 1},
    ),
    # The CPU scaling ladder's fixed base (configs/sweeps/cpu_ladder.py): a 2-layer decoder at width
    # 128 and a 2-block ViT, trained once and frozen, with the shapes VQ. The sweep varies the stack's
    # depth (its width must equal the base's), so every point shares one base, one VQ and one code set.
    "cpu_ladder": dict(
        decoder=_decoder(128, 2, 4, 2, 384, SHAPES_VOCAB, tie=True),
        vision=_vision(2, 64, 2, 192, 128, patch=8, window=32, fullatt=(1,)),
        star=dict(stack_layers=2, adapter_depth=2),
        vq=_vq(64, 128, (1,), 64, 1024, 32, res_blocks=2, heads=4, groups=32, patch=8)
        | {"usage_window": 16384, "local_encoder": True, "local_context": 1},
    ),
    # Scaling ladder for sweeps: the stack grows with the base; Qwen tokenizer vocabulary.
    "ladder_xs": dict(
        decoder=_decoder(256, 8, 4, 2, 768, QWEN_VOCAB_3B, tie=True),
        vision=_vision(8, 256, 4, 768, 256),
        star=dict(stack_layers=4, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "ladder_s": dict(
        decoder=_decoder(512, 12, 8, 2, 1536, QWEN_VOCAB_3B, tie=True),
        vision=_vision(12, 384, 6, 1152, 512),
        star=dict(stack_layers=6, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "ladder_m": dict(
        decoder=_decoder(768, 16, 12, 4, 2304, QWEN_VOCAB_3B, tie=True),
        vision=_vision(16, 512, 8, 1536, 768),
        star=dict(stack_layers=8, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "ladder_l": dict(
        decoder=_decoder(1024, 24, 16, 4, 3072, QWEN_VOCAB_3B, tie=True),
        vision=_vision(24, 768, 12, 2048, 1024),
        star=dict(stack_layers=12, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "ladder_xl": dict(
        decoder=_decoder(1536, 28, 12, 2, 8960, QWEN_VOCAB_3B, tie=True),
        vision=_vision(32, 1280, 16, 3420, 1536),
        star=dict(stack_layers=14, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "3b": dict(
        decoder=_decoder(2048, 36, 16, 2, 11008, QWEN_VOCAB_3B, head_dim=128, tie=True, mrope=(16, 24, 24)),
        vision=_vision(32, 1280, 16, 3420, 2048, fullatt=(7, 15, 23, 31)),
        star=dict(stack_layers=16, adapter_depth=2),
        vq=STAR_VQ,
    ),
    "7b": dict(
        decoder=_decoder(3584, 28, 28, 4, 18944, QWEN_VOCAB_7B, head_dim=128, tie=False, mrope=(16, 24, 24)),
        vision=_vision(32, 1280, 16, 3420, 3584, fullatt=(7, 15, 23, 31)),
        star=dict(stack_layers=14, adapter_depth=4),
        vq=STAR_VQ,
    ),
}


def get_size(name: str) -> dict:
    """A deep copy of the size `name`'s blocks; raises naming the size when it is unknown."""
    if name not in SIZES:
        raise ValueError(f"config size={name!r} is unknown; known sizes: {sorted(SIZES)}")
    return copy.deepcopy(SIZES[name])
