"""`star-jax import --config configs/star.py:size=3b,stage=generation --workdir W --star FILE
[--hf DIR] [--vq FILE] [--allow_pickle] [--cast] [--verify]`: reference STAR weights (plus the base's
Hugging Face directory and the VQ weights) -> a star_jax stage under W, ready for `generate` /
`edit` / `eval` and for the next stage's `init_from` (see `star_jax.convert.importer`).
"""

from __future__ import annotations

import sys

from absl import flags

from star_jax.cli import common
from star_jax.convert import importer, verify
from star_jax.convert.table import CheckpointError


def _define(fv):
    flags.DEFINE_string(
        "star", None, "reference STAR state dict (.safetensors; .pt with --allow_pickle)", flag_values=fv
    )
    flags.DEFINE_string("hf", None, "the base's Hugging Face Qwen2.5-VL / Qwen2 directory", flag_values=fv)
    flags.DEFINE_string("vq", None, "VQ weights (.safetensors, or .pt with --allow_pickle)", flag_values=fv)
    flags.DEFINE_string("stage", None, "stage directory to write (default: config.stage)", flag_values=fv)
    flags.DEFINE_bool("allow_pickle", False, "read .pt / .pth with torch.load(weights_only=True)", flag_values=fv)
    flags.DEFINE_bool("cast", False, "convert tensors whose dtype differs from the params'", flag_values=fv)
    flags.DEFINE_bool("verify", False, "compare the imported model's logits with PyTorch", flag_values=fv)


def main(argv: list[str]) -> int:
    fv = common.parse(argv, _define)
    if fv.config is None or fv.workdir is None or not (fv.star or fv.hf or fv.vq):
        print(
            "usage: star-jax import --config configs/star.py:size=3b,stage=generation --workdir W "
            "--star STAR.safetensors [--hf DIR] [--vq VQ.safetensors] [--allow_pickle] [--cast] [--verify]",
            file=sys.stderr,
        )
        return 2
    try:
        summary = importer.import_star(
            fv.config,
            fv.workdir,
            star_path=fv.star,
            hf_dir=fv.hf,
            vq_path=fv.vq,
            stage=fv.stage,
            allow_pickle=fv.allow_pickle,
            cast=fv.cast,
        )
    except CheckpointError as e:
        print(f"star-jax import: {e}", file=sys.stderr)
        return 1
    print(
        f"imported {summary['tensors']} tensors into {summary['stage_dir']} (step {summary['step']}): "
        f"{summary['trainable']:,} trainable, {summary['frozen']:,} frozen params"
    )
    if fv.verify:
        stage = fv.stage or fv.config.stage
        tensors = importer.reference_tensors(fv.star, fv.hf, fv.vq, allow_pickle=fv.allow_pickle)
        verify.verify_export(fv.workdir, stage, tensors=tensors, hf_dir=fv.hf)
    return 0
