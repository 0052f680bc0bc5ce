"""`star-jax export --workdir W --out DIR --format star|hf [--verify]`: a stage's weights in the
reference STAR layout (`star.safetensors`, optionally `star.pt`) or as a Hugging Face directory.

Streams tensor by tensor from the stage checkpoint (see `star_jax.convert.export`). The Hugging Face
directory also gets the stage's tokenizer (`config.data.tokenizer`: its tokenizer.json, or the
built-in vocabulary written as one), so the tokenizer travels with the weights. `--verify` works for
every stage (what it compares: `star_jax.convert.verify`).
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import flags

from star_jax.cli import common
from star_jax.convert import export, verify
from star_jax.convert.stage_reader import stage_config
from star_jax.convert.table import CheckpointError
from star_jax.convert.tensor_io import SafetensorsFile
from star_jax.text import tokenizer

STAGES = ("editing", "generation", "understanding", "vq")


def write_tokenizer(workdir: str, stage: str, out_dir: str) -> str | None:
    """Copies the stage's tokenizer into `out_dir/tokenizer.json` (the built-in one written as a
    Hugging Face tokenizer.json); None for "builtin-stems", which has no tokenizer.json form."""
    name = stage_config(workdir, stage).data.tokenizer
    dest = os.path.join(out_dir, "tokenizer.json")
    if name == "builtin":
        return tokenizer.write_builtin_tokenizer_json(dest)
    if name == "builtin-stems":
        return None
    src = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if not os.path.exists(src):
        src = os.path.join(workdir, os.path.basename(src))  # a moved workdir holds its own copy
    shutil.copyfile(src, dest)
    return dest


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '123' -> bytes."""
    units = {"GB": 1024**3, "MB": 1024**2, "KB": 1024, "B": 1}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def default_stage(workdir: str) -> str | None:
    """The latest stage of `STAGES` that has a config.json under `workdir`."""
    return next((s for s in STAGES if os.path.exists(os.path.join(workdir, s, "config.json"))), None)


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "the training workdir holding stage directories", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_enum("format", "star", ["star", "hf"], "reference STAR state dict, or Hugging Face", flag_values=fv)
    flags.DEFINE_string("stage", None, f"stage to export (default: the first of {STAGES} present)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: newest)", flag_values=fv)
    flags.DEFINE_string("dtype", None, "cast floating params, e.g. bfloat16 (default: as stored)", flag_values=fv)
    flags.DEFINE_bool("pt", False, "star format: also write star.pt holding {'state_dict': ...}", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "2GB", "hf format: shard size (e.g. 2GB, 500MB)", flag_values=fv)
    flags.DEFINE_enum("hf_arch", "auto", ["auto", "qwen2_5_vl", "qwen2"], "hf format: model class", flag_values=fv)
    flags.DEFINE_bool("verify", False, "load the export in PyTorch and compare logits with star_jax", flag_values=fv)
    common.parse_flags(fv, argv)
    if fv.workdir is None or fv.out is None:
        print("usage: star-jax export --workdir W --out DIR --format star|hf [--verify]", file=sys.stderr)
        return 2
    stage = fv.stage or default_stage(fv.workdir)
    if stage is None:
        print(f"star-jax export: no stage with a config.json under {fv.workdir}", file=sys.stderr)
        return 2
    try:
        if fv.format == "star":
            summary = export.export_star(fv.workdir, stage, fv.out, step=fv.step, dtype=fv.dtype, write_pt=fv.pt)
        else:
            vision = {"auto": None, "qwen2_5_vl": True, "qwen2": False}[fv.hf_arch]
            summary = export.export_hf(
                fv.workdir,
                stage,
                fv.out,
                step=fv.step,
                dtype=fv.dtype,
                max_shard_bytes=parse_size(fv.max_shard_size),
                with_vision=vision,
            )
            tok = write_tokenizer(fv.workdir, stage, fv.out)
            summary["files"] += [tok] if tok else []
    except (CheckpointError, OSError) as e:
        print(f"star-jax export: {e}", file=sys.stderr)
        return 1
    print(f"exported {summary['tensors']} tensors ({summary['bytes'] / 1e6:.1f} MB) of {stage}:")
    for f in summary["files"]:
        print("  " + f)
    if fv.verify:
        try:
            if fv.format == "star":
                verify.verify_export(fv.workdir, stage, tensors=SafetensorsFile(summary["files"][0]))
            else:
                verify.verify_export(fv.workdir, stage, hf_dir=fv.out)
        except ModuleNotFoundError as e:
            return common.error(argv[0], f"--verify needs PyTorch and transformers (pip install -e '.[torch]'): {e}")
        except ValueError as e:
            return common.error(argv[0], e)
    return 0
