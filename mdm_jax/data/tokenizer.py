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
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path} (train one with "
                f"`python -m mdm_jax.data.train_tokenizer` or pass the Llama-2 tokenizer.model)"
            )
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        if sp.eos_id() < 0:
            raise ValueError(f"{path}: SentencePiece model has no EOS piece; documents need one")
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
        raise ValueError(
            f"tokenizer {path} has vocab_size {tokenizer_vocab_size} but the model's "
            f"vocab_size is {model_vocab_size}; raise the model vocab_size to at least "
            f"{tokenizer_vocab_size} or use a tokenizer with a smaller vocabulary"
        )
