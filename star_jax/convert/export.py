"""Streaming export of a stage checkpoint to the reference STAR layout or a Hugging Face directory.

Tensors come one (group) at a time from `stage_reader.StageReader`; each safetensors header is
computed from shapes alone, then the per-layer tensors of `table.to_ref` are streamed into the
file(s) in order (`tensor_io.write_streaming`), each file written to a temp name and renamed.

  export_star: `star.safetensors` with the reference names (`llm.`, `stacked_ar.`,
               `pixel_adapter.`, `pixel_output_head.`, `pixel_encoder.`); optionally `star.pt`
               holding `{'state_dict': ...}`.
  export_hf:   the base (and ViT) as a Hugging Face Qwen2.5-VL (or Qwen2) directory:
               `config.json` as transformers 5 writes it, `model-0000k-of-0000n.safetensors` + index.
"""

from __future__ import annotations

import math
import os

import numpy as np

from star_jax.convert import decoder_table, hf_config, star_table, tensor_io, vision_table
from star_jax.convert.stage_reader import StageReader, abstract_star, stage_config
from star_jax.convert.table import CheckpointError, Entry, ref_names, to_ref
from star_jax.models import qwen2


def _cast_dtype(entry: Entry, stored: np.dtype, dtype: str | None) -> np.dtype:
    # Only floating params are cast; the VQ usage window holds code indices and stays float32.
    if dtype is None or entry.flax.endswith("codebook_used") or not np.issubdtype(stored, np.floating):
        return np.dtype(stored)
    return np.dtype(qwen2.to_dtype(dtype))


def _groups(reader: StageReader, entries, group_bytes: int) -> list[list[Entry]]:
    """Consecutive entries batched into one restore while their stored bytes stay under `group_bytes`."""
    groups, size = [[]], 0
    for e in entries:
        shape, dtype = reader.metadata[e.flax]
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    return groups


def _plan_and_stream(reader: StageReader, entries, dtype: str | None, group_bytes: int = 256 * 1024**2):
    """([(reference name, shape, dtype)], an iterator of (name, tensor) in that order)."""
    missing = [e.flax for e in entries if e.flax not in reader.metadata]
    if missing:
        raise CheckpointError(f"{reader.dir}: step {reader.step} lacks {len(missing)} tensors: {missing[:20]}")
    plan = []
    for e in entries:
        shape, stored = reader.metadata[e.flax]
        out = _cast_dtype(e, stored, dtype)
        plan += [(name, ref_shape, out) for name, ref_shape in ref_names(e, shape)]

    def stream():
        for group in _groups(reader, entries, group_bytes):
            values = reader.read_many([e.flax for e in group])
            for e in group:
                out = _cast_dtype(e, values[e.flax].dtype, dtype)
                for name, tensor in to_ref(e, values.pop(e.flax)):
                    yield name, tensor.astype(out, copy=False)

    return plan, stream()


def export_star(
    workdir: str, stage: str, out_dir: str, *, step: int | None = None, dtype: str | None = None, write_pt: bool = False
) -> dict:
    """Writes `out_dir/star.safetensors` (and `star.pt` when asked) with the reference STAR names.

    Args:
      workdir / stage / step: the checkpoint (newest step by default; frozen params included).
      dtype: cast floating params (e.g. "bfloat16"); None keeps the stored dtypes bit-exactly.
    Returns:
      {"files": [...], "tensors": n, "bytes": n}.
    """
    config = stage_config(workdir, stage)
    entries = star_table.star_entries(abstract_star(config, stage))
    reader = StageReader(workdir, stage, step)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plan, stream = _plan_and_stream(reader, entries, dtype)
        path = os.path.join(out_dir, "star.safetensors")
        meta = {"format": "pt", "stage": stage, "step": str(reader.step)}
        nbytes = tensor_io.write_streaming(path, plan, stream, meta)
    finally:
        reader.close()
    files = [path]
    if write_pt:
        files.append(tensor_io.write_torch_state_dict(path, os.path.join(out_dir, "star.pt")))
    return {"files": files, "tensors": len(plan), "bytes": nbytes}


def export_hf(
    workdir: str,
    stage: str,
    out_dir: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    with_vision: bool | None = None,
) -> dict:
    """Writes the stage's base (and ViT) as a Hugging Face directory that `from_pretrained` loads.

    Args:
      with_vision: Qwen2.5-VL (True) or Qwen2 text-only (False); None = Qwen2.5-VL when the stage
        has a vision tower.
      max_shard_bytes: shard size; more than one shard gets `model.safetensors.index.json`.
    Returns:
      {"files": [...], "tensors": n, "bytes": n}.
    """
    config = stage_config(workdir, stage)
    model = abstract_star(config, stage)
    if "base" not in model.components:
        raise CheckpointError(f"stage {stage!r} has no base decoder to export as Hugging Face")
    with_vision = "vision" in model.components if with_vision is None else with_vision
    hf_config.hf_config(config, with_vision=with_vision, dtype="float32")  # refuses what HF cannot load, first
    entries = decoder_table.decoder_entries(model.decoder_cfg.tie_embeddings, "base/")
    if with_vision:
        entries += vision_table.vision_entries(model.vision_cfg, "vision/", "visual.")
    reader = StageReader(workdir, stage, step)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plan, stream = _plan_and_stream(reader, entries, dtype)
        shards = tensor_io.shard_plan(plan, max_shard_bytes)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        total = sum(
            tensor_io.write_streaming(os.path.join(out_dir, f), s, stream, {"format": "pt"})
            for f, s in zip(names, shards)
        )
    finally:
        reader.close()
    files = [os.path.join(out_dir, f) for f in names]
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t[0]: f for f, s in zip(names, shards) for t in s}}
        files.append(tensor_io.write_json(os.path.join(out_dir, "model.safetensors.index.json"), index))
    stored = {np.dtype(p[2]).name for p in plan}
    cfg_dtype = "bfloat16" if stored == {"bfloat16"} else "float32"
    written = hf_config.hf_config(config, with_vision=with_vision, dtype=cfg_dtype)
    files.append(tensor_io.write_json(os.path.join(out_dir, "config.json"), written))
    return {"files": files, "tensors": len(plan), "bytes": total}
