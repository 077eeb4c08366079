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
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from mdm_jax.data.prepare import (
    BadFileError,
    InputNotFoundError,
    check_output_dir,
    iter_documents,
)
from mdm_jax.data.tokenizer import CHAT_PIECES, TokenizerError, extend
from mdm_jax.errors import ArgumentParser, positive_int, run_main

# SentencePiece skips longer "sentences"; we feed it lines, which are far shorter.
MAX_SENTENCE_BYTES = 16384
_FORMAT_VERSION = 1  # bump when the trainer options below change


def _resolve_inputs(input_glob_or_paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [input_glob_or_paths] if isinstance(input_glob_or_paths, (str, Path)) else list(
        input_glob_or_paths
    )
    paths: list[Path] = []
    missing: list[str] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        found = len(paths)
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths.extend(sorted(p.rglob("*.jsonl.zst")) + sorted(p.rglob("*.txt")))
            elif p.is_file():
                paths.append(p)
        if len(paths) == found:
            missing.append(str(item))
    if not paths:
        raise InputNotFoundError(
            f"no tokenizer training files found for --input {' '.join(map(str, items))} "
            f"({', '.join(missing)}: no such file, or no *.jsonl.zst / *.txt under it); give "
            f"globs, files or directories holding *.jsonl.zst or *.txt")
    return paths


def _iter_lines(paths: Sequence[Path], max_chars: int,
                stats: Counter | None = None) -> Iterator[str]:
    """Non-empty lines of every document, in file order, stopping after ``max_chars``.
    ``stats`` counts the lines yielded ("lines") and the records skipped, by reason."""
    stats = Counter() if stats is None else stats
    total = 0

    def usable(path: Path) -> Iterator[str]:
        for text, _, reason in iter_documents(path):
            if reason is None:
                yield text
            else:
                stats[reason] += 1

    for path in paths:
        if path.name.endswith(".jsonl.zst"):
            texts: Iterator[str] = usable(path)
        else:
            texts = iter([path.read_text(encoding="utf-8", errors="replace")])
        for text in texts:
            for line in text.splitlines():
                if not line.strip():
                    continue
                stats["lines"] += 1
                yield line
                total += len(line)
                if total >= max_chars:
                    return


def train_tokenizer(
    input_glob_or_paths: str | Path | Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    max_chars: int = 200_000_000,
    chat_tokens: bool = False,
) -> Path:
    """Train ``{model_prefix}.model``; returns its path. Skips training when the model exists
    and its sidecar ``{model_prefix}.json`` records the same arguments. ``chat_tokens``
    reserves the chat template's pieces (ids 3, 4, 5: right after unk/bos/eos)."""
    for name, value in (("vocab_size", vocab_size), ("max_chars", max_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TokenizerError(f"{name} (--{name.replace('_', '-')}) must be a positive "
                                 f"integer, got {value!r}")
    prefix = Path(str(model_prefix).removesuffix(".model"))
    model_path = prefix.with_name(prefix.name + ".model")
    sidecar = prefix.with_name(prefix.name + ".json")
    check_output_dir(model_path.parent, f"--output {model_path}: its directory")
    if model_path.is_dir():
        raise TokenizerError(f"--output {model_path} is an existing directory; pass a model "
                             f"path such as {model_path / 'tokenizer.model'}")
    paths = _resolve_inputs(input_glob_or_paths)
    args = {
        "format_version": _FORMAT_VERSION,
        "inputs": [str(p.resolve()) for p in paths],
        "input_bytes": [p.stat().st_size for p in paths],
        "vocab_size": vocab_size,
        "max_chars": max_chars,
        **({"chat_tokens": True} if chat_tokens else {}),
    }
    if model_path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == args:
                return model_path
        except ValueError:
            pass

    sidecar.unlink(missing_ok=True)  # never let an old sidecar vouch for a new model
    model = io.BytesIO()
    stats: Counter[str] = Counter()
    try:
        _train(_iter_lines(paths, max_chars, stats), model, vocab_size,
               CHAT_PIECES if chat_tokens else ())
    except BadFileError as e:
        raise e.with_hint("re-download the file, or leave it out of --input") from e
    except RuntimeError as e:  # SentencePiece's own checks: "INTERNAL: file(line) [cond] msg"
        detail = " ".join(str(e).split("]", 1)[-1].split())
        if not stats["lines"]:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats.items()) if r != "lines")
            names = ", ".join(map(str, paths[:3])) + (" ..." if len(paths) > 3 else "")
            raise TokenizerError(
                f"no text to train on in {len(paths)} input file(s) ({names}; "
                + (f"every record was skipped: {reasons}" if reasons else "they hold no text")
                + "); check --input") from e
        small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", detail)
        if small:
            raise TokenizerError(
                f"vocab_size (--vocab-size) {vocab_size} is too small: this text needs at "
                f"least {small[1]} pieces (its characters, 256 byte pieces and 3 special "
                f"pieces); use --vocab-size {small[1]} or more") from e
        large = re.search(r"Vocabulary size too high.*<= (\d+)", detail)
        if large:
            raise TokenizerError(
                f"vocab_size (--vocab-size) {vocab_size} is too large for this text: at most "
                f"{large[1]} pieces can be learned from it; use --vocab-size {large[1]} or "
                f"less, or give more text (--input, --max-chars)") from e
        raise
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = model_path.with_name(model_path.name + ".tmp")
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, model_path)
        sidecar.write_text(json.dumps(args, indent=1) + "\n")  # written last: marks completion
    except OSError as e:
        raise TokenizerError(f"--output {model_path}: cannot write it ({e.strerror or e}); "
                             f"pass a path in a writable directory") from e
    return model_path


def _train(lines: Iterator[str], model: io.BytesIO, vocab_size: int,
           reserved: Sequence[str] = ()) -> None:
    spm.SentencePieceTrainer.train(
        user_defined_symbols=list(reserved),
        sentence_iterator=lines,
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


def cli(argv: Sequence[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+",
                   help="globs, files or directories (*.jsonl.zst or *.txt)")
    p.add_argument("--output", required=True, help="model prefix or path ending in .model")
    p.add_argument("--vocab-size", type=positive_int)
    p.add_argument("--max-chars", type=positive_int, default=200_000_000)
    p.add_argument("--chat-tokens", action="store_true",
                   help="reserve the chat template's pieces " + ", ".join(CHAT_PIECES))
    p.add_argument("--extend", metavar="MODEL",
                   help="instead of training: append the chat pieces to MODEL after its last "
                        "piece (no other id moves) and write the result to --output")
    a = p.parse_args(argv)
    if a.extend:
        if a.input or a.vocab_size:
            p.error("--extend takes no --input or --vocab-size: it adds pieces to MODEL")
        path = extend(a.extend, a.output)
    else:
        if not a.input or not a.vocab_size:
            p.error("give --input and --vocab-size (or --extend MODEL)")
        path = train_tokenizer(a.input, a.output, a.vocab_size, max_chars=a.max_chars,
                               chat_tokens=a.chat_tokens)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"{path}: vocab_size={sp.GetPieceSize()} unk={sp.unk_id()} bos={sp.bos_id()} "
          f"eos={sp.eos_id()}")


if __name__ == "__main__":
    cli()
