"""Train a Llama-style SentencePiece BPE tokenizer on SlimPajama-style or plain-text files.

Llama-2 conventions: unk=0, bos=1, eos=2, no pad piece, byte fallback (no text is ever <unk>),
digits split one per token, no text normalisation. Real runs use the Llama-2
``tokenizer.model``; this exists so demos and tests have a matching small vocabulary.

    python -m mdm_jax.data.train_tokenizer --input 'data_cache/demo_corpus/train/chunk*/*.zst' \
        --output data_cache/demo_tokenizer.model --vocab-size 2048
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from mdm_jax.data.prepare import iter_documents

# SentencePiece skips longer "sentences"; we feed it lines, which are far shorter.
MAX_SENTENCE_BYTES = 16384
_FORMAT_VERSION = 1  # bump when the trainer options below change


def _resolve_inputs(input_glob_or_paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [input_glob_or_paths] if isinstance(input_glob_or_paths, (str, Path)) else list(
        input_glob_or_paths
    )
    paths: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths.extend(sorted(p.rglob("*.jsonl.zst")) + sorted(p.rglob("*.txt")))
            elif p.is_file():
                paths.append(p)
    if not paths:
        raise FileNotFoundError(f"no tokenizer training files found for {input_glob_or_paths!r}")
    return paths


def _iter_lines(paths: Sequence[Path], max_chars: int) -> Iterator[str]:
    """Non-empty lines of every document, in file order, stopping after ``max_chars``."""
    total = 0
    for path in paths:
        if path.name.endswith(".jsonl.zst"):
            texts: Iterator[str] = (t for t, _, r in iter_documents(path) if r is None)
        else:
            texts = iter([path.read_text(encoding="utf-8", errors="replace")])
        for text in texts:
            for line in text.splitlines():
                if not line.strip():
                    continue
                yield line
                total += len(line)
                if total >= max_chars:
                    return


def train_tokenizer(
    input_glob_or_paths: str | Path | Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    max_chars: int = 200_000_000,
) -> Path:
    """Train ``{model_prefix}.model``; returns its path. Skips training when the model exists
    and its sidecar ``{model_prefix}.json`` records the same arguments."""
    prefix = Path(str(model_prefix).removesuffix(".model"))
    model_path = prefix.with_name(prefix.name + ".model")
    sidecar = prefix.with_name(prefix.name + ".json")
    paths = _resolve_inputs(input_glob_or_paths)
    args = {
        "format_version": _FORMAT_VERSION,
        "inputs": [str(p.resolve()) for p in paths],
        "input_bytes": [p.stat().st_size for p in paths],
        "vocab_size": vocab_size,
        "max_chars": max_chars,
    }
    if model_path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == args:
                return model_path
        except ValueError:
            pass

    sidecar.unlink(missing_ok=True)  # never let an old sidecar vouch for a new model
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_lines(paths, max_chars),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0,  # use every line: sampling would make the result depend on RNG
        shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)
    sidecar.write_text(json.dumps(args, indent=1) + "\n")  # written last: marks completion
    return model_path


def cli(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="globs, files or directories (*.jsonl.zst or *.txt)")
    p.add_argument("--output", required=True, help="model prefix or path ending in .model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--max-chars", type=int, default=200_000_000)
    a = p.parse_args(argv)
    path = train_tokenizer(a.input, a.output, a.vocab_size, max_chars=a.max_chars)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"{path}: vocab_size={sp.GetPieceSize()} unk={sp.unk_id()} bos={sp.bos_id()} "
          f"eos={sp.eos_id()}")


if __name__ == "__main__":
    cli()
