"""Reading and writing tensor files without unpickling anything.

A minimal safetensors reader/writer on numpy memmaps (bf16 through `ml_dtypes`), so that
import streams one tensor at a time and a truncated or corrupt file is caught with a clear error.
Pickle-based files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused here; `.pt` goes through
`load_torch_weights_only` when a caller explicitly allows it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A weights file or directory that cannot be read as asked; names the file or tensors."""


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


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` to `path` atomically (temp file + rename); tensors are written one by one."""
    header, offset, arrays = {}, 0, []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


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

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def load_torch_weights_only(path: str) -> dict[str, np.ndarray]:
    """A `.pt` state dict through `torch.load(weights_only=True)` (refuses arbitrary pickled code).

    Accepts `{'state_dict': {...}}` or a flat dict of tensors; returns float/int numpy arrays
    (bf16 tensors become ml_dtypes.bfloat16).
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
