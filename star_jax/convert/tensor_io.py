"""Tensor files, read and written without unpickling anything: safetensors (lazy memory-mapped
reads, atomic writes, a streaming writer for exports) and the `torch.load(weights_only=True)` reader.

`read_tensors(path)` opens a `.safetensors` file, a Hugging Face style directory
(`model.safetensors` or a sharded index), or a `.pt` / `.pth` state dict (plain `{name: tensor}` or
`{'state_dict': ...}`) through `torch.load(weights_only=True)`; other pickle formats (`.bin`,
`.ckpt`, ...) are refused, and so is a pickle named `.safetensors`. bf16 goes through `ml_dtypes`.
A truncated or corrupt file raises `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from star_jax.convert.table import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_SUFFIXES = (".pt", ".pth")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip container

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
SAFETENSORS_DTYPES = {np.dtype(v): k for k, v in _DTYPES.items()}  # np.dtype -> safetensors name


# -- reading ----------------------------------------------------------------------------------------


class SafetensorsFile(Mapping):
    """Lazy read-only view of one .safetensors file: name -> numpy array (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds file size {size} (truncated or not safetensors)"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = header
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            end = e["data_offsets"][1]
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ends at byte {self._data_start + end} > file size {size}"
                )

    def __getitem__(self, name: str) -> np.ndarray:
        e = self._entries[name]
        start, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        shape = tuple(e["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte size does not match shape {shape} {e['dtype']}")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name]["dtype"]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class TensorDirectory(Mapping):
    """All tensors of a Hugging Face style directory (model.safetensors or a sharded index)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        files = sorted(os.listdir(path))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = [f for f in files if f.endswith(".safetensors")]
        if not shard_names:
            pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"{path}: only pickle weight files {pickles}; star_jax reads safetensors only "
                    "(nothing is unpickled). Convert them with transformers' save_pretrained(safe_serialization=True)."
                )
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, SafetensorsFile] = {}
        for shard in shard_names:
            full = os.path.join(path, shard)
            if not os.path.exists(full):
                raise CheckpointError(f"{path}: shard {shard} named by the index is missing")
            st = SafetensorsFile(full)
            for name in st:
                self._where[name] = st

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def load_torch_weights_only(path: str) -> dict[str, np.ndarray]:
    """A `.pt` state dict through `torch.load(weights_only=True)` (refuses arbitrary pickled code).

    Accepts `{'state_dict': {...}}` or a flat dict of tensors; returns numpy arrays in the stored
    dtypes (bf16 tensors become ml_dtypes.bfloat16; an int64 buffer stays int64).
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError subclasses and RuntimeError for bad files
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_tensors(path: str, *, allow_pickle: bool = True) -> Mapping[str, np.ndarray]:
    """name -> numpy tensor of a weights file or directory (lazy for safetensors).

    Args:
      allow_pickle: read `.pt` / `.pth` with `torch.load(weights_only=True)`; when False they are
        refused (the `import` CLI asks for `--allow_pickle`).
    Raises:
      CheckpointError naming the file: missing, unknown format, other pickle formats, a pickle or zip
      named `.safetensors`, a truncated file.
    """
    if os.path.isdir(path):
        return TensorDirectory(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{path}: is a pickle / torch.save file, not safetensors; refusing to read it")
        return SafetensorsFile(path)
    if path.endswith(TORCH_SUFFIXES):
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: pickle files are refused; pass --allow_pickle to read it with "
                "torch.load(weights_only=True), or convert it to .safetensors"
            )
        return load_torch_weights_only(path)
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickle format refused (nothing is unpickled; only .pt / .pth are read, with "
            "torch.load(weights_only=True)); save the state dict as .safetensors or as a .pt of plain tensors"
        )
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth or a directory)")


# -- writing ----------------------------------------------------------------------------------------


def safetensors_header(plan, metadata: Mapping[str, str] | None = None) -> bytes:
    """The padded JSON header of a safetensors file holding `plan` [(name, shape, dtype)] in order."""
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
    blob = safetensors_header(plan, metadata)
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


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` to `path` atomically (temp file + rename); tensors are written one by one."""
    arrays = {name: np.asarray(arr) for name, arr in tensors.items()}
    plan = [(name, arr.shape, arr.dtype) for name, arr in arrays.items()]
    write_streaming(path, plan, iter(arrays.items()), metadata)


def shard_plan(plan, max_bytes: int) -> list[list]:
    """`plan` [(name, shape, dtype)] cut into consecutive shards of at most `max_bytes` (or one tensor)."""
    shards, size = [[]], 0
    for item in plan:
        nbytes = math.prod(item[1]) * np.dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _to_torch(v):
    import torch

    v = np.array(v, copy=True)  # writable and contiguous (safetensors inputs may be read-only memmaps)
    if v.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(v)


def write_tensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` to `.safetensors` (atomic), or to `.pt` / `.pth` as a plain `{name: tensor}`
    state dict that `torch.load(weights_only=True)` reads."""
    if path.endswith(".safetensors"):
        save_safetensors(path, tensors, metadata={"format": "pt"})
    elif path.endswith(TORCH_SUFFIXES):
        import torch

        torch.save({k: _to_torch(v) for k, v in tensors.items()}, path)
    else:
        raise CheckpointError(f"{path}: can only write .safetensors, .pt or .pth")


def write_torch_state_dict(safetensors_path: str, pt_path: str) -> str:
    """`{'state_dict': {name: torch.Tensor}}` of a safetensors file, via torch.save (holds it all)."""
    import torch

    st = SafetensorsFile(safetensors_path)
    torch.save({"state_dict": {name: _to_torch(st[name]) for name in st}}, pt_path)
    return pt_path


def write_json(path: str, obj) -> str:
    """Writes `obj` as indented JSON atomically; returns `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path
