"""SentencePiece tokenizer wrapper.

The mask token of the diffusion model is *not* a tokenizer piece: it is the model's
``vocab_size`` (one past the last embedding row used by text), so any SentencePiece model
whose vocabulary fits below the model's vocabulary works unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from mdm_jax.errors import UserError


class TokenizerError(UserError, ValueError):
    """A tokenizer file, vocabulary or training input that cannot be used; the message names
    the file or value and the fix."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer model file does not exist."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A loaded SentencePiece model plus the facts the data pipeline records about it."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, sha256: str):
        self._sp = processor
        self.path = path
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        hint = ("train one with `python -m mdm_jax.data.train_tokenizer` or pass the Llama-2 "
                "tokenizer.model")
        if path.is_dir():
            raise TokenizerError(f"tokenizer {path} is a directory, not a SentencePiece .model "
                                 f"file; {hint}")
        if not path.is_file():
            raise TokenizerNotFoundError(f"tokenizer model not found: {path} ({hint})")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            detail = " ".join(str(e).split())
            raise TokenizerError(f"{path} is not a valid SentencePiece model ({detail}); "
                                 f"{hint}") from e
        if sp.eos_id() < 0:
            raise TokenizerError(f"{path}: SentencePiece model has no EOS piece; documents "
                                 f"need one: {hint}")
        return cls(sp, path, file_sha256(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.Encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int, path: str | Path) -> None:
    """The model's embedding must cover every token id the tokenizer can emit."""
    if tokenizer_vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {path} has vocab_size {tokenizer_vocab_size} but the model's "
            f"vocab_size is {model_vocab_size}; raise the model vocab_size to at least "
            f"{tokenizer_vocab_size} or use a tokenizer with a smaller vocabulary"
        )
