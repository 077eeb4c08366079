"""Safetensors written one tensor at a time, sharded folders with an index, and safe reading.

`safetensors.numpy.save_file` needs every tensor in memory at once; an export of a large model
would then hold the parameters twice. The format is an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, byte offsets) and the raw bytes, so the header can be
written from the shapes alone and each tensor made, written and dropped in turn. Files are
read back with the safetensors library (and so checked by it).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

from mdm_jax.errors import UserError

DTYPES = {"float32": (np.dtype(np.float32), "F32"),
          "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}
INDEX_NAME = "model.safetensors.index.json"


class ExportError(UserError, ValueError):
    """An export or import that cannot work; the message names the key or file and the fix."""


def write_safetensors(path: str, tensors: list[tuple[str, tuple, Callable[[], np.ndarray]]],
                      dtype: str, metadata: dict[str, str] | None = None) -> int:
    """Write (name, shape, make) tensors in order, calling `make` only when its bytes are due.
    Returns the bytes of tensor data. The file appears under its name only when complete."""
    np_dtype, st_dtype = DTYPES[dtype]
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, shape, _ in tensors:
        size = int(np.prod(shape)) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, make in tensors:
            array = np.ascontiguousarray(make(), dtype=np_dtype)
            if array.shape != tuple(shape):
                raise ExportError(f"{name}: made shape {array.shape}, expected {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # raw bytes, any dtype
            del array
    os.replace(tmp, path)
    return offset


def write_sharded(out_dir: str, tensors: list, dtype: str, metadata: dict[str, str],
                  max_shard_bytes: int, single_name: str = "model.safetensors") -> list[str]:
    """One file when the tensors fit in `max_shard_bytes`, else `model-0000k-of-0000n` shards
    plus a Hugging Face index. Returns the files written."""
    itemsize = DTYPES[dtype][0].itemsize
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        shards.append(current)
    if len(shards) <= 1:
        write_safetensors(os.path.join(out_dir, single_name), tensors, dtype, metadata)
        return [single_name]
    names, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(out_dir, name), shard, dtype, metadata)
        weight_map.update({t[0]: name for t in shard})
        names.append(name)
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*names, INDEX_NAME]


class TensorReader:
    """Tensors by name from a .safetensors file, a sharded folder (index) or a .pth state dict
    loaded with torch.load(weights_only=True): nothing is unpickled beyond tensors."""

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, str] = {}  # name -> safetensors file
        self._state_dict = None
        if not os.path.exists(path):
            raise ExportError(f"{path} does not exist; give an export folder, a .safetensors "
                              f"file or a .pth state dict")
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)["weight_map"]
                    files = {k: os.path.join(path, v) for k, v in weight_map.items()}
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ExportError(f"{index} is not a safetensors index (a JSON object "
                                      f"with a weight_map): {type(e).__name__}: {e}") from None
                missing = sorted({f for f in files.values() if not os.path.exists(f)})
                if missing:
                    raise ExportError(f"{index} names file(s) that are not there: "
                                      f"{', '.join(map(os.path.basename, missing))}")
                self._files = files
            else:
                files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
                if not files:
                    raise ExportError(f"{path} holds no .safetensors file or {INDEX_NAME}")
                for name in files:
                    self._add_file(os.path.join(path, name))
        elif path.endswith(".safetensors"):
            self._add_file(path)
        elif path.endswith((".pth", ".pt", ".bin")):
            self._load_torch(path)
        else:
            raise ExportError(f"{path}: expected a folder, a .safetensors file or a .pth state "
                              f"dict")

    def _add_file(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="np") as f:
                for key in f.keys():
                    self._files[key] = path
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path} is not a readable safetensors file: {e}") from None

    def _load_torch(self, path: str) -> None:
        import pickle
        import zipfile

        import torch

        # Memory-map the zip format torch.save writes by default; the legacy format
        # (_use_new_zipfile_serialization=False, older PyTorch) cannot be mapped and is read
        # whole. Both go through the weights-only unpickler.
        mmap = zipfile.is_zipfile(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ExportError(
                f"{path} is not a plain state dict of tensors, so it was not loaded (mdm_jax "
                f"never unpickles arbitrary objects): "
                f"{(str(e) or type(e).__name__).splitlines()[0][:200]}") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]  # lit-gpt training checkpoints nest the weights under "model"
        if not isinstance(sd, dict):
            raise ExportError(f"{path} holds a {type(sd).__name__}, not a state dict")
        self._state_dict = sd

    def keys(self) -> set[str]:
        return set(self._state_dict) if self._state_dict is not None else set(self._files)

    def get(self, name: str) -> np.ndarray:
        if self._state_dict is not None:
            t = self._state_dict[name]
            if not hasattr(t, "numpy"):
                raise ExportError(f"{self.path}: {name} is a {type(t).__name__}, not a tensor")
            return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
        from safetensors import safe_open

        try:
            with safe_open(self._files[name], framework="np") as f:
                return f.get_tensor(name)
        except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read through torch
            with safe_open(self._files[name], framework="pt") as f:
                return f.get_tensor(name).float().numpy()

    def metadata(self) -> dict[str, str]:
        if self._state_dict is not None or not self._files:
            return {}
        from safetensors import safe_open

        with safe_open(next(iter(self._files.values())), framework="np") as f:
            return dict(f.metadata() or {})
