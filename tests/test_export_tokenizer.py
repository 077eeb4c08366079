"""The Hugging Face tokenizer of a large vocabulary: written straight from the SentencePiece
model (no transformers, whose slow-to-fast conversion took minutes at 128k pieces), it encodes
and decodes exactly as SentencePiece. Needs tokenizers and transformers (the `torch` extra)."""

from __future__ import annotations

import json
import random
import sys

import pytest

transformers = pytest.importorskip("transformers")

from mdm_jax.data.tokenizer import CHAT_PIECES, Tokenizer  # noqa: E402
from mdm_jax.data.train_tokenizer import train_tokenizer  # noqa: E402
from mdm_jax.export.tokenizer_files import MASK_TOKEN, write_tokenizer  # noqa: E402

VOCAB = 32000


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> str:
    """A 32,000-piece SentencePiece BPE model with the chat pieces, trained (in about a second)
    on made-up words: enough distinct words that SentencePiece learns every piece."""
    root = tmp_path_factory.mktemp("large_tokenizer")
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60000)})
    lines = [" ".join(rng.choices(words, k=12)) + rng.choice(".,!? ") for _ in range(30000)]
    (root / "text.txt").write_text("\n".join(lines))
    return str(train_tokenizer([str(root / "text.txt")], str(root / "tok"), VOCAB,
                               chat_tokens=True))


def _texts(model: str, n: int) -> list[str]:
    """Runs of random pieces (words, pieces inside words, whitespace runs), chat pieces inside
    text, and awkward whitespace and characters outside the vocabulary (byte fallback)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    rng = random.Random(1)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
              and sp.id_to_piece(i) not in CHAT_PIECES]
    texts = ["".join(rng.choices(pieces, k=rng.randint(1, 10))).replace("▁", " ")
             for _ in range(n)]
    texts += [rng.choice(texts) + rng.choice(CHAT_PIECES) + rng.choice(texts)
              for _ in range(50)]
    texts += ["".join(rng.choices("ba ▁\t\nké日😀 ", k=rng.randint(0, 12))) for _ in range(200)]
    return texts + ["", " ", "  two", "end ", "\n\n", "Ünïcödé 日本語 😀"]


def test_large_vocabulary_tokenizer_is_written_without_transformers_and_encodes_exactly(
        large_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = Tokenizer.load(large_model)
    assert ours.vocab_size == VOCAB and ours.has_chat_pieces
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # `import transformers` fails
        files = write_tokenizer(str(tmp_path), large_model, VOCAB + 5, hf=True,
                                model_max_length=256)
    assert files == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = _texts(large_model, 3000)
    assert hf(texts)["input_ids"] == [ours.encode(t) for t in texts]
    for text in texts[::10]:
        ids = ours.encode(text)
        assert hf.decode(ids) == ours.decode(ids), text
    # The specials: SentencePiece's, then placeholders up to the mask id.
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        0, ours.bos_id, ours.eos_id, ours.eos_id)
    assert [hf.convert_tokens_to_ids(p) for p in CHAT_PIECES] == [3, 4, 5]
    assert hf.convert_tokens_to_ids("<|mdm_unused_4|>") == VOCAB + 4
    assert hf.mask_token == MASK_TOKEN and hf.mask_token_id == VOCAB + 5 == len(hf) - 1
    assert hf.model_max_length == 256
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
