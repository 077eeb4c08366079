"""Offline packing: SlimPajama ``*.jsonl.zst`` -> fixed-length token blocks in ArrayRecord shards.

Follows TinyLlama/SMDM: drop RedPajamaGithub, encode each document as tokens + EOS (no BOS),
concatenate everything, cut (seq_len + 1)-token blocks (the +1 is the ARM shift). Each block is
one ArrayRecord record of raw little-endian uint16 (int32 for vocabularies >= 65536).
Bad records are counted by reason in the manifest, never fatal. A record with no
``meta.redpajama_set_name`` (your own data: ``{"text": ...}`` only) counts under the source
``user`` unless ``--require-source``. A file that is not a complete zstd stream (truncated,
corrupt, zero bytes) stops the run, after checkpointing the files before it, unless
``--skip-bad-files``: then it is skipped and listed in the manifest's ``skipped_files``. A run
that keeps no document at all is an error.

    python -m mdm_jax.data.prepare --input SlimPajama --output prepared/train \
        --tokenizer tokenizer.model --split train --workers 8

The same output from many machines: ``python -m mdm_jax.data.beam_prepare`` (Apache Beam).
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter

from mdm_jax import storage
from mdm_jax.data.tokenizer import Tokenizer, file_sha256
from mdm_jax.errors import ArgumentParser, UserError, positive_int, run_main

KNOWN_SOURCES = frozenset(
    {
        "RedPajamaCommonCrawl",
        "RedPajamaC4",
        "RedPajamaGithub",
        "RedPajamaBook",
        "RedPajamaArXiv",
        "RedPajamaWikipedia",
        "RedPajamaStackExchange",
    }
)
USER_SOURCE = "user"  # the source of records with no meta.redpajama_set_name
SOURCE_NAMES = KNOWN_SOURCES | {USER_SOURCE}  # what --drop-sources / --keep-sources accept
SKIP_REASONS = (
    "bad_json",
    "bad_utf8",
    "missing_text",
    "empty_text",
    "dropped_source",
    "unknown_source",
    "missing_source",  # no meta.redpajama_set_name under require_source
)
MANIFEST = "manifest.json"
_ZSTD_CHUNK = 1 << 20
BAD_FILE_HINT = "re-download the file"


class PrepareError(UserError, ValueError):
    """Input data or options that preparation cannot use; the message names them and the fix."""


class InputNotFoundError(PrepareError, FileNotFoundError):
    """No input file matched."""


class BadFileError(PrepareError):
    """An input file that is not a complete zstd stream (truncated, corrupt, empty, unreadable).

    ``hint`` is the fix the message offers; each entry point sets its own."""

    def __init__(self, path: str | Path, reason: str, hint: str = BAD_FILE_HINT):
        self.path, self.reason, self.hint = Path(path), reason, hint
        super().__init__(f"{path}: {reason}; {hint}")

    def with_hint(self, hint: str) -> BadFileError:
        return BadFileError(self.path, self.reason, hint)


class _ZstdRaw(io.RawIOBase):
    """Streaming zstd decoder that, unlike ``stream_reader``, notices a truncated last frame."""

    def __init__(self, f: io.BufferedIOBase, path: Path):
        self._f, self._path = f, path
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending, self._pos = b"", 0  # decoded bytes not yet handed out
        self._in_frame = False  # True once bytes of an unfinished frame have been fed
        self._size = 0  # compressed bytes read

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos == len(self._pending):
            try:
                chunk = self._f.read(_ZSTD_CHUNK)
            except OSError as e:
                raise BadFileError(self._path, f"cannot read it ({e.strerror or e})") from e
            if not chunk:
                if self._in_frame:
                    raise BadFileError(self._path, "truncated zstd stream (file ends mid-frame)")
                if self._size == 0:
                    # Not even a zstd header: an interrupted download or copy, i.e. a file
                    # truncated at byte 0 (an empty document set compresses to >= 9 bytes).
                    raise BadFileError(self._path, "empty file (0 bytes), not a zstd stream")
                return 0
            self._size += len(chunk)
            out = []
            while chunk:
                try:
                    out.append(self._obj.decompress(chunk))
                except zstandard.ZstdError as e:
                    raise BadFileError(self._path, f"corrupt zstd stream ({e})") from e
                self._in_frame = not self._obj.eof
                # A file may hold several frames: restart the decoder on the leftover bytes.
                chunk = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
            self._pending, self._pos = b"".join(out), 0
        n = min(len(buf), len(self._pending) - self._pos)
        buf[:n] = memoryview(self._pending)[self._pos : self._pos + n]
        self._pos += n
        return n


def iter_lines(path: str | Path) -> Iterator[bytes]:
    """Stream the raw lines (split on ``\\n`` only, newline kept) of one ``.jsonl.zst`` file."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadFileError(path, f"cannot open it ({e.strerror or e})") from e
    with f:
        yield from read_lines(f, path)


def read_lines(f: io.BufferedIOBase, path: str | Path) -> Iterator[bytes]:
    """The raw lines of the open ``.jsonl.zst`` stream ``f`` (a local file or an object store's
    reader); ``path`` names it in errors."""
    yield from io.BufferedReader(_ZstdRaw(f, Path(path)), buffer_size=_ZSTD_CHUNK)


def classify_line(
    line: bytes, drop_sources: Collection[str] = (), require_source: bool = False
) -> tuple[str | None, str | None, str | None] | None:
    """``(text, source, None)`` for a usable document, ``(None, None, reason)`` for a skipped
    record (reason is one of ``SKIP_REASONS``), ``None`` for a blank line (not a record).

    A record with no ``meta.redpajama_set_name`` is the user's own data: its source is
    ``USER_SOURCE``, or it is skipped as ``missing_source`` when ``require_source``.

    The line is decoded with ``surrogateescape`` so one bad byte costs one record, not the file.
    """
    s = line.decode("utf-8", "surrogateescape")
    if not s.strip():
        return None
    try:
        rec = json.loads(s)
    except ValueError:
        return None, None, "bad_json"
    if not isinstance(rec, dict):
        return None, None, "bad_json"
    text = rec.get("text")
    if not isinstance(text, str):
        return None, None, "missing_text"
    try:
        text.encode("utf-8")  # raw bad bytes or lone \ud800 escapes
    except UnicodeEncodeError:
        return None, None, "bad_utf8"
    if not text.strip():
        return None, None, "empty_text"
    meta = rec.get("meta")
    source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    if source is None:
        if require_source:
            return None, None, "missing_source"
        source = USER_SOURCE
    elif source not in KNOWN_SOURCES:
        return None, None, "unknown_source"
    if source in drop_sources:
        return None, None, "dropped_source"
    return text, source, None


def iter_documents(
    path: str | Path, drop_sources: Sequence[str] = (), require_source: bool = False
) -> Iterator[tuple[str | None, str | None, str | None]]:
    """Stream one ``.jsonl.zst`` file, yielding ``(text, source, None)`` for usable documents
    and ``(None, None, reason)`` for skipped records (reason is one of ``SKIP_REASONS``).

    Lines are decoded with ``surrogateescape`` so one bad byte costs one record, not the file.
    """
    drop = frozenset(drop_sources)
    for line in iter_lines(path):
        doc = classify_line(line, drop, require_source)
        if doc is not None:
            yield doc


def list_input_files(input_dir: str | Path, split: str) -> list[Path]:
    root = Path(input_dir) / split
    files = sorted(root.glob("chunk*/*.jsonl.zst"))
    if not files:
        if not Path(input_dir).is_dir():
            why = f"{input_dir} is not a directory"
        elif not root.is_dir():
            why = f"there is no {split}/ under {input_dir}; check --split"
        elif any(root.glob("*.jsonl.zst")):
            why = f"files directly in {root} are not read: move them into {root}/chunk1/"
        else:
            why = "SlimPajama's layout is {train,validation,test}/chunkK/*.jsonl.zst"
        raise InputNotFoundError(
            f"no input files: {root}/chunk*/*.jsonl.zst matched nothing ({why}); check --input"
        )
    return files


# --- batch encoding (runs in worker processes when workers > 1) ----------------------------
#
# The main process streams each input file and cuts its raw lines into batches (at most
# _BATCH_LINES lines or about _BATCH_BYTES bytes); workers parse, filter and encode a batch and
# hand back its tokens. Results are consumed in submission order, so the token stream does not
# depend on the worker count, and at most a few batches per worker are in flight, so memory
# stays flat however large an input file is.

_BATCH_LINES = 256
_BATCH_BYTES = 1 << 19
_TOKENIZER: Tokenizer | None = None
_DROP: frozenset[str] = frozenset()
_REQUIRE_SOURCE = False
_DTYPE = "uint16"


def _init_worker(tokenizer: str | Tokenizer, drop_sources: Sequence[str] = (),
                 dtype: str = "uint16", require_source: bool = False) -> None:
    global _TOKENIZER, _DROP, _DTYPE, _REQUIRE_SOURCE
    _TOKENIZER = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    _DROP, _DTYPE, _REQUIRE_SOURCE = frozenset(drop_sources), dtype, require_source


def _encode_lines(lines: list[bytes]) -> dict:
    assert _TOKENIZER is not None, "call _init_worker first"
    return encode_lines(lines, _TOKENIZER, _DROP, _REQUIRE_SOURCE, _DTYPE)


def encode_lines(lines: Sequence[bytes], tok: Tokenizer, drop: Collection[str] = frozenset(),
                 require_source: bool = False, dtype: str = "uint16") -> dict:
    """Tokens (+EOS per document) of a batch of raw lines, with document/source/skip counts."""
    texts: list[str] = []
    srcs: list[str] = []
    skipped: Counter[str] = Counter()
    for line in lines:
        doc = classify_line(line, drop, require_source)
        if doc is None:
            continue
        text, source, reason = doc
        if reason is not None:
            skipped[reason] += 1
        else:
            texts.append(text)
            srcs.append(source)
    sources: Counter[str] = Counter()
    tokens = np.zeros(0, dtype)
    if texts:
        eos = tok.eos_id
        ids = tok.encode_batch(texts)
        for d, src in zip(ids, srcs, strict=True):
            d.append(eos)
            sources[src] += len(d)
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype,
                             count=sum(sources.values()))
    return dict(tokens=tokens, documents=len(texts), sources=sources, skipped=skipped)


def line_batches(lines: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Raw lines cut into batches of at most _BATCH_LINES lines or about _BATCH_BYTES bytes."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- shard writing and resumable progress ----------------------------------------------------
#
# Shard k holds blocks [k * shard_blocks, (k + 1) * shard_blocks) of the packed stream, so shard
# boundaries depend only on the inputs, never on when a run was interrupted. Tokens not yet in
# a finished shard live in memory and in OUTPUT/pending-K.tokens (raw, appended per batch);
# after each input file OUTPUT/progress.json records the files done, the counts, the finished
# shards and how many pending tokens are valid. A killed run restarts from that record: it
# truncates the pending file to the recorded length, deletes shards it had not recorded, and
# carries on with the next input file. The pending file of a checkpoint is only deleted after
# a newer progress.json names its successor, so a kill at any instant leaves a consistent pair.

PROGRESS = "progress.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_name(split: str, k: int) -> str:
    """Shard k holds blocks [k * shard_blocks, (k + 1) * shard_blocks) of the packed stream."""
    return f"{split}-{k:05d}.array_record"


def write_array_record(path: str | Path, blocks: np.ndarray) -> str:
    """Write ``blocks`` (one record per row) to ``path`` as ArrayRecord; returns its sha256."""
    # group_size:1 keeps each block independently readable: Grain reads at random.
    writer = ArrayRecordWriter(str(path), "group_size:1")
    if not writer.ok():
        raise OSError(f"cannot open ArrayRecord writer for {path}")
    for row in blocks:
        writer.write(row.tobytes())
    writer.close()
    # The finished file's checksum (read back from the page cache just written), so a run
    # can tell a swapped or damaged shard from the one prepared here.
    return file_sha256(path)


class _ShardWriter:
    """Cuts the token stream into blocks and writes fixed-size ArrayRecord shards atomically."""

    def __init__(self, output_dir: Path, split: str, block_len: int, shard_blocks: int,
                 dtype: str):
        self.output_dir, self.split = output_dir, split
        self.block_len, self.shard_blocks = block_len, shard_blocks
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self._chunks: list[np.ndarray] = []  # tokens not yet in a shard, in order
        self._pending_len = 0

    def pending_path(self, k: int | None = None) -> Path:
        k = len(self.shards) if k is None else k
        return self.output_dir / f"pending-{k:05d}.tokens"

    def _write_shard(self, blocks: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        tmp = self.output_dir / (name + ".tmp")
        sha256 = write_array_record(tmp, blocks)
        os.replace(tmp, self.output_dir / name)
        self.shards.append({"file": name, "blocks": len(blocks), "sha256": sha256})

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream (and the pending file); write every shard that fills.

        Pending tokens are kept as a list of chunks and joined only when a shard fills, so the
        cost is linear in the tokens added, not in the shard size times the number of calls.
        """
        tokens = tokens.astype(self.dtype, copy=False)
        with open(self.pending_path(), "ab") as f:
            f.write(tokens.tobytes())
        self._chunks.append(tokens)
        self._pending_len += len(tokens)
        full = self.shard_blocks * self.block_len
        if self._pending_len < full:
            return
        stream = np.concatenate(self._chunks)
        start = 0
        while len(stream) - start >= full:
            self._write_shard(stream[start : start + full].reshape(self.shard_blocks,
                                                                  self.block_len))
            start += full
        rest = stream[start:].copy()
        self._chunks, self._pending_len = [rest], len(rest)
        tmp = self.pending_path().with_suffix(".tmp")
        tmp.write_bytes(rest.tobytes())
        os.replace(tmp, self.pending_path())

    def pending_tokens(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)

    def state(self) -> dict:
        return {"shards": list(self.shards), "pending_tokens": self._pending_len}

    def restore(self, state: dict) -> None:
        self.shards = [dict(s) for s in state["shards"]]
        n = int(state["pending_tokens"])
        path = self.pending_path()
        raw = path.read_bytes()[: n * self.dtype.itemsize] if n or path.exists() else b""
        if len(raw) != n * self.dtype.itemsize:
            raise OSError(f"{self.pending_path()} holds fewer than the {n} tokens recorded")
        self._chunks = [np.frombuffer(raw, self.dtype).copy()]
        self._pending_len = n
        self.pending_path().write_bytes(raw)

    def clean(self, keep_pending: bool = True) -> None:
        """Remove shards past those recorded, temporaries and stale pending files."""
        done = {s["file"] for s in self.shards}
        current = self.pending_path().name if keep_pending else None
        for p in self.output_dir.glob(f"{self.split}-*.array_record*"):
            if p.name not in done:
                p.unlink()
        for p in self.output_dir.glob("pending-*"):
            if p.name != current:
                p.unlink()

    def finish(self) -> int:
        """Write the last (short) shard; returns the number of tail tokens dropped."""
        pending = self.pending_tokens()
        n = len(pending) // self.block_len
        if n:
            self._write_shard(pending[: n * self.block_len].reshape(n, self.block_len))
        tail = len(pending) - n * self.block_len
        self._chunks, self._pending_len = [], 0
        return tail


# --- driver ----------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Raised by ``prepare(stop_after_files=N)``: simulates a crash after N input files."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


SKIP_BAD_FILES_HINT = ("re-download the file, or pass --skip-bad-files to skip it (it is then "
                       "listed under skipped_files in manifest.json)")


def check_output_dir(path: str | Path, flag: str = "--output") -> None:
    """A clear error when ``path`` (or a parent) is an existing file: it cannot be a directory."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == path else f"is inside {p}, a file"
                raise PrepareError(f"{flag} {path} {what}, not a directory; pass a directory "
                                   f"path (it is created if missing)")
            return


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PrepareError(f"{name} (--{name.replace('_', '-')}) must be a positive "
                               f"integer, got {value!r}")


def no_document_message(root: str | Path, n_files: int, skipped: dict[str, int],
                         bad_files: list[dict], drop: Collection[str]) -> str:
    """Why a run kept nothing, and what to change."""
    why = []
    if any(skipped.values()):
        why.append("skipped records: " + ", ".join(f"{r}={n}" for r, n in skipped.items() if n))
    if bad_files:
        why.append(f"skipped {len(bad_files)} bad file(s), first {bad_files[0]['file']}: "
                   f"{bad_files[0]['reason']}")
    if not why:
        why.append("the files hold no records")
    fixes = []
    if skipped.get("unknown_source"):
        fixes.append(f"meta.redpajama_set_name must be one of {sorted(KNOWN_SOURCES)} or absent "
                     f"(your own data, source {USER_SOURCE!r})")
    if skipped.get("missing_source"):
        fixes.append("drop --require-source to keep records with no meta.redpajama_set_name")
    if skipped.get("dropped_source"):
        fixes.append(f"check --drop-sources/--keep-sources (they drop {sorted(drop)})")
    if skipped.get("bad_json") or skipped.get("missing_text") or skipped.get("empty_text"):
        fixes.append('each line must be a JSON object with a non-empty "text" string')
    if bad_files:
        fixes.append("re-download the bad files")
    return (f"{root}: kept no document from {n_files} input file(s) ({'; '.join(why)}); "
            + ("; ".join(fixes) or "check --input and --split"))


def resolve_drop(drop_sources: Sequence[str], keep_sources: Sequence[str] | None) -> set[str]:
    """The sources to drop: ``drop_sources``, or every source not in ``keep_sources``."""
    for name, given in (("drop_sources", drop_sources), ("keep_sources", keep_sources or ())):
        unknown = set(given) - SOURCE_NAMES
        if unknown:
            raise PrepareError(f"{name} (--{name.replace('_', '-')}) {sorted(unknown)} are not "
                               f"source names; known: {sorted(SOURCE_NAMES)}")
    if keep_sources is not None:
        return SOURCE_NAMES - set(keep_sources)
    return set(drop_sources)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


def input_record(input_dir: str, input_files: list[str], input_bytes: list[int], split: str,
                 seq_len: int, tokenizer_sha256: str, drop: Collection[str], shard_blocks: int,
                 require_source: bool) -> dict:
    """What the output is made from (the manifest's ``inputs``): a run whose record matches a
    finished manifest's has nothing to do."""
    inputs = {
        "input_dir": input_dir,
        "input_files": input_files,
        "input_bytes": input_bytes,
        "split": split,
        "seq_len": seq_len,
        "tokenizer_sha256": tokenizer_sha256,
        "drop_sources": sorted(drop),
        "shard_blocks": shard_blocks,
    }
    if require_source:  # only when set, so outputs made before the option still match
        inputs["require_source"] = True
    return inputs


def reusable_manifest(old: dict | None, inputs: dict, manifest_path: str | Path,
                      input_dir: str | Path, shard_exists: Callable[[str], bool],
                      skip_bad_files: bool) -> dict | None:
    """``old`` when it was made from ``inputs`` and all its shards are there (a file it skipped
    is an error unless ``skip_bad_files``), else None."""
    if old is None or old.get("inputs") != inputs or not all(
            shard_exists(s["file"]) for s in old["shards"]):
        return None
    bad = old.get("skipped_files") or []
    if bad and not skip_bad_files:
        raise BadFileError(f"{str(input_dir).rstrip('/')}/{bad[0]['file']}",
                           f"{bad[0]['reason']} (skipped by the run that wrote "
                           f"{manifest_path})", SKIP_BAD_FILES_HINT)
    return old


def make_manifest(documents: int, tokens: int, tail: int, sources: dict[str, int],
                  skipped: dict[str, int], bad_files: list[dict], tok: Tokenizer,
                  shards: list[dict], inputs: dict) -> dict:
    """The manifest the loader reads; every field comes from the counts and the inputs."""
    return {
        "documents": documents,
        "tokens": tokens,
        "blocks": sum(s["blocks"] for s in shards),
        "tail_tokens_dropped": tail,
        "sources": dict(sorted(sources.items())),
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
        "skipped_files": bad_files,
        "tokenizer": str(tok.path),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "seq_len": inputs["seq_len"],
        "dtype": token_dtype(tok.vocab_size),
        "split": inputs["split"],
        "shards": shards,
        "inputs": inputs,
    }


def prepare(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer_path: str | Path,
    split: str = "train",
    seq_len: int = 2048,
    workers: int = 1,
    drop_sources: Sequence[str] = ("RedPajamaGithub",),
    shard_blocks: int = 8192,
    keep_sources: Sequence[str] | None = None,
    stop_after_files: int | None = None,
    require_source: bool = False,
    skip_bad_files: bool = False,
) -> dict:
    """Tokenize and pack ``input_dir/{split}/chunk*/*.jsonl.zst`` into ``output_dir``.

    Documents whose ``meta.redpajama_set_name`` is in ``drop_sources`` (or, when
    ``keep_sources`` is given, not in it) are counted as ``dropped_source``; records with no
    set name are the source ``"user"`` (skipped as ``missing_source`` when
    ``require_source``). A file that is not a complete zstd stream raises ``BadFileError``
    (the files before it are checkpointed) unless ``skip_bad_files``: then none of its
    records are used and it is listed under ``skipped_files``. Keeping no document at all
    raises ``PrepareError``. Returns the manifest (also written to
    ``output_dir/manifest.json``). Idempotent: a manifest made from the same inputs and
    settings is returned without redoing work; an interrupted run resumes after the last input
    file it finished and ends with the same bytes as an uninterrupted one.
    """
    check_positive(seq_len=seq_len, shard_blocks=shard_blocks, workers=workers)
    drop = resolve_drop(drop_sources, keep_sources)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir)
    tok = Tokenizer.load(tokenizer_path)
    files = list_input_files(input_dir, split)
    dtype = token_dtype(tok.vocab_size)
    inputs = input_record(str(input_dir.resolve()), [str(p.relative_to(input_dir)) for p in files],
                          [p.stat().st_size for p in files], split, seq_len, tok.sha256, drop,
                          shard_blocks, require_source)
    manifest_path = output_dir / MANIFEST
    old = reusable_manifest(_read_json(manifest_path), inputs, manifest_path, input_dir,
                            lambda name: (output_dir / name).is_file(), skip_bad_files)
    if old is not None:
        return old

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"--output {output_dir}: cannot create the directory "
                           f"({e.strerror or e}); pass a writable directory path") from e
    # A crash below must not leave a manifest that describes shards we are about to replace.
    manifest_path.unlink(missing_ok=True)
    writer = _ShardWriter(output_dir, split, seq_len + 1, shard_blocks, dtype)
    counts = {"files_done": 0, "documents": 0, "tokens": 0, "sources": {},
              "skipped": {r: 0 for r in SKIP_REASONS}, "bad_files": []}
    progress_path = output_dir / PROGRESS
    progress = _read_json(progress_path)
    resumed = False
    if progress is not None and progress.get("inputs") == inputs:
        try:
            writer.restore(progress["writer"])
            counts = progress["counts"]
            resumed = True
        except (OSError, KeyError, ValueError):
            writer = _ShardWriter(output_dir, split, seq_len + 1, shard_blocks, dtype)
    writer.clean(keep_pending=resumed)
    if not resumed:
        progress_path.unlink(missing_ok=True)

    sources: Counter[str] = Counter(counts["sources"])
    skipped: Counter[str] = Counter(counts["skipped"])
    first = counts["files_done"]
    start = time.perf_counter()
    new_docs = new_tokens = 0
    delay = float(os.environ.get("MDM_JAX_PREPARE_TEST_DELAY", "0"))  # tests kill mid-run
    from tqdm import tqdm  # here, not at the top: worker processes import this module

    bar = tqdm(total=len(files), initial=first, unit="file", desc=f"prepare {split}",
               dynamic_ncols=True)
    init_args = (str(tok.path), tuple(sorted(drop)), dtype, require_source)
    pool = None
    # In order: ("batch", result) for each batch submitted, ("end", None) after a file's last.
    queue: deque[tuple[str, object]] = deque()
    in_flight = 0
    max_in_flight = 4 * workers

    def consume() -> None:
        """Take the oldest queue entry: pack a batch's tokens, or checkpoint a finished file."""
        nonlocal counts, in_flight, new_docs, new_tokens, checkpoint_shards, checkpoint
        kind, item = queue.popleft()
        if kind == "batch":
            in_flight -= 1
            res = item.get() if pool is not None else item
            writer.add(res["tokens"])
            sources.update(res["sources"])
            skipped.update(res["skipped"])
            counts["documents"] += res["documents"]
            counts["tokens"] += len(res["tokens"])
            new_docs += res["documents"]
            new_tokens += len(res["tokens"])
            return
        counts["files_done"] += 1
        counts["sources"], counts["skipped"] = dict(sources), dict(skipped)
        checkpoint = copy.deepcopy({"counts": counts, "writer": writer.state()})
        _atomic_write_text(progress_path, json.dumps({"inputs": inputs, **checkpoint}) + "\n")
        # The previous checkpoint's pending file (and any that shards closed since) is only
        # needed until this record is written.
        for k in range(checkpoint_shards, len(writer.shards)):
            writer.pending_path(k).unlink(missing_ok=True)
        checkpoint_shards = len(writer.shards)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs_s=f"{new_docs / elapsed:.0f}", tok_s=f"{new_tokens / elapsed:.3g}")
        bar.update()
        if delay:
            time.sleep(delay)
        if stop_after_files is not None and counts["files_done"] - first >= stop_after_files:
            raise Interrupted(f"stopped after {stop_after_files} file(s) as asked")

    def roll_back() -> None:
        """Forget everything since the last checkpoint (the batches of a skipped bad file)."""
        nonlocal counts, in_flight
        in_flight -= sum(kind == "batch" for kind, _ in queue)
        queue.clear()
        writer.restore(checkpoint["writer"])
        writer.clean(keep_pending=True)
        counts = copy.deepcopy(checkpoint["counts"])
        sources.clear()
        sources.update(counts["sources"])
        skipped.clear()
        skipped.update(counts["skipped"])

    counts = dict(counts)
    counts.setdefault("bad_files", [])  # a progress.json written before skip_bad_files
    checkpoint_shards = len(writer.shards)
    counts["sources"], counts["skipped"] = dict(sources), dict(skipped)
    checkpoint = copy.deepcopy({"counts": counts, "writer": writer.state()})
    try:
        if workers > 1 and first < len(files):
            ctx = multiprocessing.get_context("spawn")  # safe with JAX/threads in the parent
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
        else:
            _init_worker(tok, *init_args[1:])
        for path in files[first:]:
            batches = line_batches(iter_lines(path))
            while True:
                try:
                    lines = next(batches, None)
                except BadFileError as e:
                    # First checkpoint the files before it whose batches are still in flight.
                    ends = [i for i, (kind, _) in enumerate(queue) if kind == "end"]
                    for _ in range(ends[-1] + 1 if ends else 0):
                        consume()
                    if not skip_bad_files:
                        raise e.with_hint(SKIP_BAD_FILES_HINT) from e
                    # Skip it whole: none of its batches (some may be packed already) count.
                    roll_back()
                    counts["bad_files"].append(
                        {"file": str(path.relative_to(input_dir)), "reason": e.reason})
                    bar.write(f"warning: skipping bad file {e.path}: {e.reason}",
                              file=sys.stderr)
                    lines = None
                if lines is None:
                    break
                if pool is None:
                    queue.append(("batch", _encode_lines(lines)))
                else:
                    queue.append(("batch", pool.apply_async(_encode_lines, (lines,))))
                in_flight += 1
                while in_flight > max_in_flight or (pool is None and queue):
                    consume()
            queue.append(("end", None))
            while queue and (queue[0][0] == "end" or pool is None):
                consume()
        while queue:
            consume()
        if counts["documents"] == 0:
            raise PrepareError(no_document_message(input_dir / split, len(files), dict(skipped),
                                                    counts["bad_files"], drop))
    except UserError:
        bar.leave = False  # the error line replaces the bar
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    tail = writer.finish()

    manifest = make_manifest(counts["documents"], counts["tokens"], tail, sources, skipped,
                             counts["bad_files"], tok, writer.shards, inputs)
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    writer.clean(keep_pending=False)
    progress_path.unlink(missing_ok=True)
    return manifest


def upload(local_dir: str | Path, remote_dir: str, shard_files: Sequence[str]) -> None:
    """Copy finished shards to object storage, then the manifest: a reader that finds the
    manifest finds every shard it lists."""
    dest = storage.as_path(remote_dir)
    for name in [*shard_files, MANIFEST]:
        with open(Path(local_dir) / name, "rb") as src, (dest / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    """The options that decide what is read and how it is packed, for every prepare command
    (this one, and data/beam_prepare.py's): the same names, defaults and meaning."""
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--shard-blocks", type=positive_int, default=8192)
    p.add_argument("--drop-sources", default="RedPajamaGithub",
                   help="comma-separated meta.redpajama_set_name values to drop ('' keeps all; "
                        f"'{USER_SOURCE}' is records with no set name)")
    p.add_argument("--keep-sources", default=None,
                   help="comma-separated set names to keep (overrides --drop-sources)")
    p.add_argument("--require-source", action="store_true",
                   help="skip records with no meta.redpajama_set_name (counted as "
                        f"missing_source) instead of keeping them as source '{USER_SOURCE}'")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip an input file that is truncated or corrupt (listed under "
                        "skipped_files in manifest.json) instead of stopping")


def source_names(text: str | None) -> list[str] | None:
    """A --drop-sources/--keep-sources value as a list (None: the option was not given)."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def cli(argv: Sequence[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="SlimPajama-style root holding {split}/chunk*/")
    p.add_argument("--output", required=True,
                   help="directory for shards and manifest.json (local, or gs://BUCKET/PATH: "
                        "written in --staging first, then uploaded, manifest last)")
    p.add_argument("--staging", default=None,
                   help="local directory for a gs:// --output (default: prepare_staging/SPLIT)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--workers", type=positive_int, default=1)
    add_corpus_arguments(p)
    a = p.parse_args(argv)
    names = source_names
    start = time.perf_counter()
    remote = storage.is_remote(a.output)
    local_out = (a.staging or os.path.join("prepare_staging", a.split)) if remote else a.output
    check_output_dir(local_out, "--staging" if remote else "--output")
    m = prepare(a.input, local_out, a.tokenizer, split=a.split, seq_len=a.seq_len,
                workers=a.workers, shard_blocks=a.shard_blocks,
                drop_sources=names(a.drop_sources) or (), keep_sources=names(a.keep_sources),
                require_source=a.require_source, skip_bad_files=a.skip_bad_files)
    if remote:
        upload(local_out, a.output, [s["file"] for s in m["shards"]])
    summary = {k: m.get(k) for k in ("documents", "tokens", "blocks", "tail_tokens_dropped",
                                     "skipped", "skipped_files", "sources", "dtype")}
    print(json.dumps(summary, indent=1))
    if m.get("skipped_files"):
        print(f"warning: skipped {len(m['skipped_files'])} bad input file(s), listed under "
              f"skipped_files in {MANIFEST}", file=sys.stderr)
    print(f"wrote {len(m['shards'])} shard(s) and {MANIFEST} to {a.output} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    cli()
