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

# The chat template's role header and end-of-turn markers (LLaDA's Instruct template). They are
# user-defined pieces of the SentencePiece model: always one id each, wherever they appear in
# text. `train_tokenizer --chat-tokens` reserves them; `extend` appends them to an existing
# model after its last piece, so no other id moves.
HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
CHAT_PIECES = (HEADER_START, HEADER_END, END_OF_TURN)


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
        hint = ("train one with `python -m mdm_jax.data.train_tokenizer` or pass the Llama-2 "
                "tokenizer.model")
        if not str(path).strip():  # Path("") is ".", a directory: say what is missing
            raise TokenizerNotFoundError(f"no tokenizer given (an empty path); {hint}")
        path = Path(path)
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

    def piece_id(self, piece: str) -> int | None:
        """The id of a user-defined piece (a chat marker), or None if the model lacks it."""
        i = self._sp.PieceToId(piece)
        return i if self._sp.IdToPiece(i) == piece and not self._sp.IsUnknown(i) else None

    @property
    def has_chat_pieces(self) -> bool:
        return all(self.piece_id(p) is not None for p in CHAT_PIECES)

    @property
    def eot_id(self) -> int | None:
        return self.piece_id(END_OF_TURN)

    def require_chat_pieces(self) -> None:
        if not self.has_chat_pieces:
            raise TokenizerError(
                f"tokenizer {self.path} has no chat pieces ({', '.join(CHAT_PIECES)}); train "
                f"one with `python -m mdm_jax.data.train_tokenizer --chat-tokens ...` or add "
                f"them to this one (no other id moves) with `python -m "
                f"mdm_jax.data.train_tokenizer --extend {self.path} --output NEW.model`, or use "
                f"the plain template")

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


def extend(path: str | Path, out: str | Path, pieces: Sequence[str] = CHAT_PIECES) -> Path:
    """Write `path`'s SentencePiece model with `pieces` appended as user-defined pieces after
    its last piece (those it already has are kept where they are): every existing id keeps
    its meaning, so data prepared and models trained with the old model stay valid."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    Tokenizer.load(path)  # a clear error for a missing or broken model
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    have = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece not in have:
            new = proto.pieces.add()
            new.piece, new.score = piece, 0.0
            new.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise TokenizerError(f"--output {out} is the model being extended; write the extended "
                             f"model to a new path (the old one stays valid for old data)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out)
    return out
