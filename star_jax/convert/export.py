"""Streaming export of a stage checkpoint to the reference STAR layout or a Hugging Face directory.

`StageReader` reads one star_jax tensor at a time from a stage directory (`frozen/` plus the newest
`ckpt/<step>/state` params and non-param variables) with Orbax partial restores straight into
numpy, so the whole model never has to be in one host's memory: the peak is about the largest
single (stacked) tensor. The writer computes each safetensors header from shapes alone, then
streams the per-layer tensors of `mapping.to_ref` into the file(s) in order, each file written to
a temp name and renamed into place.

  export_star: `star.safetensors` with the reference names (`llm.`, `stacked_ar.`,
               `pixel_adapter.`, `pixel_output_head.`, `pixel_encoder.`); optionally `star.pt`
               holding `{'state_dict': ...}`.
  export_hf:   the base (and ViT) as a Hugging Face Qwen2.5-VL (or Qwen2) directory:
               `config.json` as transformers 5 writes it, `model-0000k-of-0000n.safetensors` + index.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from star_jax import sharding
from star_jax.convert import mapping
from star_jax.convert.checkpoint_files import _NAMES as SAFETENSORS_DTYPES
from star_jax.convert.checkpoint_files import CheckpointError
from star_jax.models import qwen2, star

QWEN_SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
QWEN_SPECIAL_IDS["vision_end_token_id"] = 151653


# -- reading a stage, tensor by tensor -----------------------------------------------------------


def stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
    """The config a stage was trained (or imported) with: `workdir/<stage>/config.json`."""
    path = os.path.join(workdir, stage, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; is {os.path.join(workdir, stage)} a star_jax stage directory?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def abstract_star(config, stage: str | None = None) -> star.Star:
    """The stage's STAR model with ShapeDtypeStruct params (nothing allocated)."""
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, state = nnx.get_abstract_model(lambda: star.build(config, stage, rngs=nnx.Rngs(0)), mesh)
    return nnx.merge(graphdef, state)


def _leaves(tree, prefix=()) -> Iterator[tuple[tuple, object]]:
    tree = tree.tree if hasattr(tree, "tree") else tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


class StageReader:
    """One stage's saved tensors, read one at a time as numpy arrays (frozen and newest step).

    `metadata`: star_jax path ('/'-joined) -> (shape, dtype). `read(path)` -> np.ndarray.
    """

    def __init__(self, workdir: str, stage: str, step: int | None = None):
        self.dir = os.path.abspath(os.path.join(workdir, stage))
        ckpt_dir = os.path.join(self.dir, "ckpt")
        steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(ckpt_dir) else []
        if step is None and not steps:
            raise CheckpointError(f"{self.dir}: no checkpoint steps under ckpt/")
        self.step = steps[-1] if step is None else step
        if self.step not in steps:
            raise CheckpointError(f"{self.dir}: no step {self.step} (saved: {steps})")
        self._ckptr = ocp.PyTreeCheckpointer()
        self.metadata: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._where: dict[str, tuple[str, tuple]] = {}  # path -> (directory, key path in that tree)
        frozen = os.path.join(self.dir, "frozen")
        sources = [(frozen, "")] if os.path.isdir(frozen) else []
        sources.append((os.path.join(ckpt_dir, str(self.step), "state"), "state"))
        for directory, kind in sources:
            for keys, meta in _leaves(self._ckptr.metadata(directory).item_metadata):
                names = [str(k) for k in keys]
                if kind == "state":  # params/... and other/... map to model paths; opt_state is skipped
                    if names[0] not in ("params", "other"):
                        continue
                    names = names[1:]
                path = "/".join(names)
                self.metadata[path] = (tuple(meta.shape), np.dtype(meta.dtype))
                self._where[path] = (directory, keys)

    def read(self, path: str) -> np.ndarray:
        """The saved tensor at star_jax `path` (its stored dtype), restored alone into host memory."""
        return self.read_many([path])[path]

    def read_many(self, paths: list[str]) -> dict[str, np.ndarray]:
        """Several saved tensors in one Orbax partial restore per directory: path -> np.ndarray."""
        unknown = [p for p in paths if p not in self._where]
        if unknown:
            raise CheckpointError(f"{self.dir}: tensors {unknown[:10]} are not in the checkpoint (step {self.step})")
        out = {}
        for directory in {self._where[p][0] for p in paths}:
            group = [p for p in paths if self._where[p][0] == directory]
            item, args = {}, {}
            for p in group:
                *parents, leaf = self._where[p][1]
                node_i, node_a = item, args
                for k in parents:
                    node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
                node_i[leaf], node_a[leaf] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
            restored = self._ckptr.restore(
                directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
            )
            for p in group:
                value = restored
                for k in self._where[p][1]:
                    value = value[k]
                out[p] = np.asarray(value)
        return out

    def close(self) -> None:
        self._ckptr.close()


# -- streaming safetensors writer -----------------------------------------------------------------


def _header(plan: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict | None) -> bytes:
    header, offset = {}, 0
    for name, shape, dtype in plan:
        if np.dtype(dtype) not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def write_streaming(path: str, plan, tensors: Iterator[tuple[str, np.ndarray]], metadata=None) -> int:
    """Writes the tensors of `plan` [(name, shape, dtype)] to one safetensors file, pulling them from
    `tensors` in plan order (one in memory at a time); atomic. Returns the bytes of tensor data."""
    blob = _header(plan, metadata)
    tmp, total = f"{path}.tmp-{os.getpid()}", 0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in plan:
                got_name, arr = next(tensors)
                if got_name != name or arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise CheckpointError(
                        f"{path}: tensor {got_name!r} {arr.shape} {arr.dtype} does not match the planned "
                        f"{name!r} {tuple(shape)} {np.dtype(dtype)}"
                    )
                f.write(np.ascontiguousarray(arr).tobytes())
                total += arr.nbytes
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return total


def _shards(plan, max_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for item in plan:
        nbytes = math.prod(item[1]) * np.dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


# -- the two export formats -----------------------------------------------------------------------


def _cast_dtype(entry: mapping.Entry, stored: np.dtype, dtype: str | None) -> np.dtype:
    # Only floating params are cast; the VQ usage window holds code indices and stays float32.
    if dtype is None or entry.flax.endswith("codebook_used") or not np.issubdtype(stored, np.floating):
        return np.dtype(stored)
    return np.dtype(qwen2.to_dtype(dtype))


def _groups(reader: StageReader, entries, group_bytes: int) -> list[list[mapping.Entry]]:
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
    missing = [e.flax for e in entries if e.flax not in reader.metadata]
    if missing:
        raise CheckpointError(f"{reader.dir}: step {reader.step} lacks {len(missing)} tensors: {missing[:20]}")
    plan = []
    for e in entries:
        shape, stored = reader.metadata[e.flax]
        out = _cast_dtype(e, stored, dtype)
        plan += [(name, ref_shape, out) for name, ref_shape in mapping.ref_names(e, shape)]

    def stream():
        for group in _groups(reader, entries, group_bytes):
            values = reader.read_many([e.flax for e in group])
            for e in group:
                out = _cast_dtype(e, values[e.flax].dtype, dtype)
                for name, tensor in mapping.to_ref(e, values.pop(e.flax)):
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
    entries = mapping.star_entries(abstract_star(config, stage))
    reader = StageReader(workdir, stage, step)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plan, stream = _plan_and_stream(reader, entries, dtype)
        path = os.path.join(out_dir, "star.safetensors")
        nbytes = write_streaming(path, plan, stream, {"format": "pt", "stage": stage, "step": str(reader.step)})
    finally:
        reader.close()
    files = [path]
    if write_pt:
        files.append(write_torch_state_dict(path, os.path.join(out_dir, "star.pt")))
    return {"files": files, "tensors": len(plan), "bytes": nbytes}


def write_torch_state_dict(safetensors_path: str, pt_path: str) -> str:
    """`{'state_dict': {name: torch.Tensor}}` of a safetensors file, via torch.save (holds it all)."""
    import torch

    from star_jax.convert.checkpoint_files import SafetensorsFile

    st = SafetensorsFile(safetensors_path)
    state = {}
    for name in st:
        arr = np.ascontiguousarray(st[name])
        if arr.dtype == np.dtype(qwen2.to_dtype("bfloat16")):
            state[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(arr.copy())
    torch.save({"state_dict": state}, pt_path)
    return pt_path


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


def hf_config(config, *, with_vision: bool, dtype: str) -> dict:
    """config.json in the shape transformers 5 writes for Qwen2.5-VL (or Qwen2 without vision)."""
    d = qwen2.DecoderConfig.from_dict(config.model.decoder)
    text = qwen2_text_config(d)
    common = dict(dtype=dtype, tie_word_embeddings=d.tie_embeddings, transformers_version="5.23.0")
    if not with_vision:
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **text, **common)
    from star_jax.models import vision

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
        tokens_per_second=4,
        rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
    )
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        text_config=text,
        vision_config=vis,
        **_special_ids(d.vocab_size),
        **common,
    )


def _special_ids(vocab_size: int) -> dict:
    if vocab_size > max(QWEN_SPECIAL_IDS.values()):
        return dict(QWEN_SPECIAL_IDS)
    from star_jax.text.tokenizer import BuiltinTokenizer  # the shapes world's small vocabulary

    tok = BuiltinTokenizer()
    names = dict(image_token_id="<|image_pad|>", video_token_id="<|vision_pad|>")
    names |= dict(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return {k: tok.special(v) for k, v in names.items()}


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
    hf_config(config, with_vision=with_vision, dtype="float32")  # refuses what HF cannot load, before writing
    entries = mapping.decoder_entries(model.decoder_cfg.tie_embeddings, "base/")
    if with_vision:
        from star_jax.convert import hf_vision

        entries += hf_vision.vision_entries(model.vision_cfg, "vision/", "visual.")
    reader = StageReader(workdir, stage, step)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plan, stream = _plan_and_stream(reader, entries, dtype)
        shards = _shards(plan, max_shard_bytes)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        total = sum(
            write_streaming(os.path.join(out_dir, f), s, stream, {"format": "pt"}) for f, s in zip(names, shards)
        )
    finally:
        reader.close()
    files = [os.path.join(out_dir, f) for f in names]
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t[0]: f for f, s in zip(names, shards) for t in s}}
        files.append(_write_json(os.path.join(out_dir, "model.safetensors.index.json"), index))
    stored = {np.dtype(p[2]).name for p in plan}
    cfg_dtype = "bfloat16" if stored == {"bfloat16"} else "float32"
    files.append(
        _write_json(os.path.join(out_dir, "config.json"), hf_config(config, with_vision=with_vision, dtype=cfg_dtype))
    )
    return {"files": files, "tensors": len(plan), "bytes": total}


def _write_json(path: str, obj) -> str:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def restore_stage_params(workdir: str, stage: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Every saved tensor of a stage (params and non-param variables) as flat path -> numpy array."""
    reader = StageReader(workdir, stage, step)
    try:
        return reader.read_many(list(reader.metadata))
    finally:
        reader.close()
