"""`star-jax import --config configs/star.py:size=3b,stage=generation --workdir W [--hf DIR] [--vq FILE]
[--star FILE] [--stage NAME] [--allow_pickle] [--cast] [--verify]`: published weights -> a star_jax
stage under W, ready for `generate` / `edit` / `understand` / `eval`, for `star-jax train` of that
stage (it resumes from the imported step 0) and for the next stage's `init_from`.

The lab's path needs no STAR file: `--hf` a transformers Qwen2.5-VL directory (base decoder and ViT;
its config.json is checked against the size, its tokenizer.json is copied into W) and `--vq` the
STAR-VQ weights in the reference layout; the stack is copied from the base's last N layers, the
adapter and head start fresh. `stage=understanding` needs only `--hf`, `stage=vq` only `--vq`.
With `--star` (a released STAR state dict) every part comes from the files (see
`star_jax.convert.importer`). Every mistake is one line on stderr (exit 2) and writes nothing.
"""

from __future__ import annotations

from absl import flags

from star_jax.cli import common
from star_jax.convert import importer, verify

USAGE = (
    "usage: star-jax import --config configs/star.py:size=3b,stage=generation --workdir W "
    "--hf QWEN_DIR --vq VQ.safetensors [--star STAR.safetensors] [--allow_pickle] [--cast] [--verify]"
)


def _define(fv):
    flags.DEFINE_string(
        "star", None, "reference STAR state dict (.safetensors; .pt with --allow_pickle)", flag_values=fv
    )
    flags.DEFINE_string("hf", None, "the base's Hugging Face Qwen2.5-VL / Qwen2 directory", flag_values=fv)
    flags.DEFINE_string("vq", None, "VQ weights (.safetensors, or .pt with --allow_pickle)", flag_values=fv)
    flags.DEFINE_string("stage", None, "stage directory to write (default: config.stage)", flag_values=fv)
    flags.DEFINE_bool("allow_pickle", False, "read .pt / .pth with torch.load(weights_only=True)", flag_values=fv)
    flags.DEFINE_bool("cast", False, "--star: convert tensors whose dtype differs from the params'", flag_values=fv)
    flags.DEFINE_bool("verify", False, "compare the imported model with PyTorch (needs [torch])", flag_values=fv)


def main(argv: list[str]) -> int:
    """Runs `star-jax import` on `argv` (argv[0] the program name); returns the exit status."""
    fv = common.parse(argv, _define, __doc__)
    prog = argv[0] if argv else "star-jax import"
    if fv.config is None or fv.workdir is None or not (fv.star or fv.hf or fv.vq):
        return common.error(prog, f"needs --config, --workdir and at least one of --hf / --vq / --star ({USAGE})")
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
    except ValueError as e:  # CheckpointError, a bad source or tokenizer, an unknown stage
        return common.error(prog, e)
    print(
        f"imported {', '.join(summary['sources'])} into {summary['stage_dir']} (step {summary['step']}): "
        f"{summary['trainable']:,} trainable, {summary['frozen']:,} frozen params"
    )
    if summary["tokenizer"]:
        print(f"tokenizer: {summary['tokenizer']} copied into {fv.workdir}")
    if fv.verify:
        stage = fv.stage or fv.config.stage
        try:
            tensors = importer.reference_tensors(fv.star, fv.hf, fv.vq, allow_pickle=fv.allow_pickle)
            verify.verify_export(fv.workdir, stage, tensors=tensors, hf_dir=fv.hf)
        except ModuleNotFoundError as e:
            return common.error(prog, f"--verify needs PyTorch and transformers (pip install -e '.[torch]'): {e}")
        except ValueError as e:
            return common.error(prog, e)
    return 0
