"""Read (and, for tests, write) lit-gpt packed ``*.bin`` files, as SMDM/TinyLlama prepared them.

File layout (lit-gpt ``packed_dataset.py``): a 24-byte header ``b"LITPKDS"`` + u64 version (1)
+ u8 dtype code + u64 chunk_size (all little-endian), then ``chunk_size`` raw tokens. TinyLlama
and SMDM write ``chunk_size = 2049 * k`` so each file holds ``k`` training blocks of 2048 + 1
tokens; tokens past the last whole block of a file are unused, as in lit-gpt's reader.

A directory of such files is used wherever a prepared directory is: pass it as
``litgpt:DIR`` (or just ``DIR`` when it has ``*.bin`` files and no ``manifest.json``). The
files carry neither the block length nor the vocabulary, so both come from an optional
``DIR/litgpt.json`` (``{"seq_len": 2048, "vocab_size": 32000}``); without it the block length is
2048 (when every chunk_size is a multiple of 2049) and the vocabulary is Llama-2's 32000, the
values TinyLlama/SMDM used. Every block read is checked against that vocabulary, so a wrong
guess fails loudly, naming the file, instead of training on out-of-range ids.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

MAGIC = b"LITPKDS"
HEADER_SIZE = 24
VERSION = 1
PREFIX = "litgpt:"
SIDECAR = "litgpt.json"
DEFAULT_SEQ_LEN = 2048
DEFAULT_VOCAB_SIZE = 32000  # Llama-2, as used by TinyLlama and SMDM
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
          7: np.float64, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_INTEGER_CODES = (1, 2, 3, 4, 5, 8)


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(dtype, chunk_size) of one lit-gpt file; ValueError naming the file when it is not one."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    hint = ("expected a lit-gpt packed file (24-byte header b'LITPKDS' + u64 version 1 + u8 dtype "
            "code + u64 chunk_size, as written by TinyLlama/SMDM's prepare scripts); "
            "re-create it, or prepare the raw text with `python -m mdm_jax.data.prepare`")
    if len(head) < HEADER_SIZE:
        raise ValueError(f"{path}: {len(head)} bytes, shorter than the 24-byte header; {hint}")
    if head[:7] != MAGIC:
        raise ValueError(f"{path}: bad magic {head[:7]!r}; {hint}")
    (version,) = struct.unpack("<Q", head[7:15])
    if version != VERSION:
        raise ValueError(f"{path}: unsupported lit-gpt version {version} (only {VERSION}); {hint}")
    code = head[15]
    if code not in _INTEGER_CODES:
        raise ValueError(f"{path}: dtype code {code} is not an integer token type "
                         f"(known codes {sorted(DTYPES)}; tokens need one of {_INTEGER_CODES})")
    (chunk_size,) = struct.unpack("<Q", head[16:24])
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    want = HEADER_SIZE + chunk_size * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        raise ValueError(f"{path}: {size} bytes but the header promises {want} (chunk_size "
                         f"{chunk_size} of {dtype.name}); the file is truncated or not lit-gpt")
    return dtype, chunk_size


def write_bin(path: str | Path, tokens: np.ndarray, chunk_size: int | None = None,
              dtype: str | np.dtype = "uint16", pad_id: int = 0) -> Path:
    """Write one lit-gpt packed file (padding ``tokens`` with ``pad_id`` up to chunk_size)."""
    dtype = np.dtype(dtype)
    tokens = np.asarray(tokens)
    chunk_size = len(tokens) if chunk_size is None else chunk_size
    if len(tokens) > chunk_size:
        raise ValueError(f"{len(tokens)} tokens do not fit chunk_size {chunk_size}")
    body = np.full(chunk_size, pad_id, dtype.newbyteorder("<"))
    body[: len(tokens)] = tokens
    path = Path(path)
    path.write_bytes(MAGIC + struct.pack("<QBQ", VERSION, _CODES[dtype], chunk_size)
                     + body.tobytes())
    return path


def strip_prefix(data_dir: str | Path) -> Path:
    s = str(data_dir)
    return Path(s[len(PREFIX):] if s.startswith(PREFIX) else s)


def is_litgpt_dir(data_dir: str | Path) -> bool:
    """``litgpt:DIR``, or a directory with ``*.bin`` files and no ``manifest.json``."""
    if str(data_dir).startswith(PREFIX):
        return True
    d = Path(data_dir)
    return d.is_dir() and not (d / "manifest.json").exists() and any(d.glob("*.bin"))


def _files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{d}: no lit-gpt *.bin files (expected TinyLlama/SMDM packed "
                                f"data such as train_slimpajama_0_0000000000.bin)")
    return files


def manifest(data_dir: str | Path) -> dict:
    """A manifest, shaped like ``prepare``'s, describing a directory of lit-gpt files."""
    d = strip_prefix(data_dir)
    files = _files(d)
    side = {}
    if (d / SIDECAR).is_file():
        try:
            side = json.loads((d / SIDECAR).read_text())
        except ValueError as e:
            raise ValueError(f"{d / SIDECAR} is not valid JSON: {e}") from e
    headers = [read_header(f) for f in files]
    chunks = [c for _, c in headers]
    if "seq_len" in side:
        seq_len = int(side["seq_len"])
    elif all(c % (DEFAULT_SEQ_LEN + 1) == 0 for c in chunks):
        seq_len = DEFAULT_SEQ_LEN
    else:
        raise ValueError(f"{d}: chunk sizes {sorted(set(chunks))[:4]} are not multiples of "
                         f"{DEFAULT_SEQ_LEN + 1}; write {d / SIDECAR} with "
                         f'{{"seq_len": N}} giving the block length (N + 1 tokens per block)')
    block = seq_len + 1
    per_file = [c // block for c in chunks]
    if not sum(per_file):
        raise ValueError(f"{d}: no file holds a whole block of {block} tokens")
    return {
        "format": "litgpt",
        "files": [f.name for f in files],
        "file_blocks": per_file,
        "blocks": sum(per_file),
        "tokens": sum(per_file) * block,
        "seq_len": seq_len,
        "vocab_size": int(side.get("vocab_size", DEFAULT_VOCAB_SIZE)),
        "vocab_size_from": "litgpt.json" if "vocab_size" in side else "default (Llama-2)",
        "dtype": headers[0][0].name,
    }


class LitGptBlocks:
    """Random-access source of [seq_len + 1] np.int32 blocks from lit-gpt ``*.bin`` files.

    Files are memory-mapped lazily (and re-opened after pickling, so Grain workers can use it).
    """

    def __init__(self, data_dir: str | Path):
        self.data_dir = strip_prefix(data_dir)
        m = manifest(self.data_dir)
        self.seq_len, self.vocab_size = m["seq_len"], m["vocab_size"]
        self._files = [self.data_dir / f for f in m["files"]]
        self._ends = np.cumsum(m["file_blocks"])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getstate__(self):
        return dict(self.__dict__, _maps={})

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            dtype, chunk = read_header(self._files[k])
            self._maps[k] = np.memmap(self._files[k], dtype=dtype, mode="r",
                                      offset=HEADER_SIZE, shape=(chunk,))
        return self._maps[k]

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = (index - (int(self._ends[k - 1]) if k else 0)) * (self.seq_len + 1)
        block = np.asarray(self._map(k)[start : start + self.seq_len + 1], dtype=np.int32)
        if block.size and (block.min() < 0 or block.max() >= self.vocab_size):
            raise ValueError(
                f"{self._files[k]}: block {index} holds token ids outside [0, {self.vocab_size})"
                f" (min {block.min()}, max {block.max()}); set the tokenizer's vocabulary in "
                f"{self.data_dir / SIDECAR} as {{\"vocab_size\": V}}")
        return block

    def __repr__(self) -> str:
        return f"LitGptBlocks({str(self.data_dir)!r}, blocks={len(self)}, seq_len={self.seq_len})"
