"""The exported Hugging Face tokenizer of a chat tokenizer: its chat template gives the ids of
`mdm_jax.data.templates` ("chat"), its chat markers are SentencePiece's single ids, and
generation stops at the end of a turn. Needs transformers (the `torch` extra)."""

from __future__ import annotations

import json
import random

import pytest

transformers = pytest.importorskip("transformers")

from mdm_jax.data import templates  # noqa: E402
from mdm_jax.data.tokenizer import CHAT_PIECES, Tokenizer, extend  # noqa: E402
from mdm_jax.data.train_tokenizer import train_tokenizer  # noqa: E402
from mdm_jax.export.tokenizer_files import generation_config, write_tokenizer  # noqa: E402

_WORDS = ("the king queen said to of and my in is was with for that not thou shall will what "
          "good night day love sword crown heaven fair sweet speak come go hath know see hear "
          "user assistant system hello there how can help joke").split()
TEXTS = ["The king said to the queen.", " leading space", "  two", "tabs\tand  gaps\n\n",
         "Ünïcödé 日本語 😀", "", "end ", "a<|eot_id|>b", " <|eot_id|> x <|eot_id|>",
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|eot_id|>",
         "x <|start_header_id|><|end_header_id|>\n\n"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{"plain": 400 pieces, "extended": plain + the chat pieces appended (ids 400-402),
    "reserved": trained with --chat-tokens (ids 3-5)}: model paths."""
    root = tmp_path_factory.mktemp("chat_tokenizers")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
             for _ in range(3000)]
    (root / "text.txt").write_text("\n".join(lines))
    plain = train_tokenizer([str(root / "text.txt")], str(root / "plain"), 400)
    return {"plain": str(plain),
            "extended": str(extend(plain, root / "extended.model")),
            "reserved": str(train_tokenizer([str(root / "text.txt")], str(root / "reserved"),
                                            400, chat_tokens=True))}


def _hf(tmp_path, monkeypatch, model: str):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tokenizer(str(tmp_path), model, 512, hf=True)  # placeholders up to the mask id
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def _chat_ids(hf, messages, add_generation_prompt=True) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a dict in transformers 5


@pytest.mark.parametrize("kind", ["extended", "reserved"])
def test_chat_template_gives_the_ids_mdm_jax_trains_on(tokenizers, tmp_path, monkeypatch, kind):
    ours = Tokenizer.load(tokenizers[kind])
    hf = _hf(tmp_path, monkeypatch, tokenizers[kind])
    user = [{"role": "user", "content": " Hello there\n"}]
    assert _chat_ids(hf, user) == templates.turn_ids(ours, "chat", "Hello there", first=True)
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert _chat_ids(hf, system) == templates.turn_ids(ours, "chat", "Hello there", first=True,
                                                       system="Be brief.")
    # A dialogue: every prompt of dialogue_pairs (the history holds each answer and its
    # end-of-turn), and the whole dialogue without a generation prompt.
    exchanges = [("Hello  there", "Hi! How can I help?"), ("Tell me\n a joke.", " No. "),
                 ("日本語 😀", "ok")]
    pairs = templates.dialogue_pairs(ours, "chat", "Be brief.", exchanges)
    messages = [system[0]]
    for (question, answer), (prompt, response) in zip(exchanges, pairs, strict=True):
        messages.append({"role": "user", "content": question})
        assert _chat_ids(hf, messages) == prompt
        messages.append({"role": "assistant", "content": answer})
        assert _chat_ids(hf, messages, False) == prompt + response[:-1]  # no EOS
    # The rendered text encodes the same (LLaDA's examples tokenise the text).
    text = hf.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert hf(text)["input_ids"] == pairs[0][0]


@pytest.mark.parametrize("kind", ["plain", "extended", "reserved"])
def test_hf_tokenizer_encodes_and_decodes_like_sentencepiece(tokenizers, tmp_path, monkeypatch,
                                                             kind):
    ours = Tokenizer.load(tokenizers[kind])
    hf = _hf(tmp_path, monkeypatch, tokenizers[kind])
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids), text
    assert hf.eos_token_id == ours.eos_id and hf.bos_token_id == ours.bos_id
    assert hf.mask_token_id == 512 and len(hf) == 513
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) == (kind != "plain")
    if kind == "plain":
        return
    for piece in CHAT_PIECES:  # one id each, SentencePiece's, special
        assert hf(f"a{piece}b")["input_ids"] == ours.encode(f"a{piece}b")
        assert hf.convert_tokens_to_ids(piece) == ours.piece_id(piece)
        # The known difference (tokenizer_files): a text that is just a piece has no "▁".
        assert [ours.piece_id("▁"), *hf(piece)["input_ids"]] == ours.encode(piece)
    prompt = templates.turn_ids(ours, "chat", "Hello there", first=True)
    answer = templates.answer_ids(ours, "chat", "Fine, thanks.")
    assert hf.decode(prompt + answer, skip_special_tokens=True) == (
        "user\n\nHello thereassistant\n\n Fine, thanks.")
    assert not any(p in hf.decode(prompt, skip_special_tokens=True) for p in CHAT_PIECES)


def test_generation_stops_at_eos_and_end_of_turn(tokenizers):
    chat = Tokenizer.load(tokenizers["extended"])
    assert generation_config(tokenizers["extended"]) == {
        "bos_token_id": chat.bos_id, "pad_token_id": chat.eos_id,
        "eos_token_id": [chat.eos_id, chat.eot_id]}
    assert chat.eot_id == 402 and Tokenizer.load(tokenizers["reserved"]).eot_id == 5
    plain = Tokenizer.load(tokenizers["plain"])
    assert generation_config(tokenizers["plain"])["eos_token_id"] == plain.eos_id


def test_llada_export_of_a_chat_model(tokenizers, tmp_path, monkeypatch):
    """Through the writer: a nano MDM exported with the chat tokenizer."""
    from conftest import nano_config

    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.export.writer import export
    from mdm_jax.trainer import Trainer, resolved_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = nano_config(workdir=str(tmp_path / "run"))
    trainer = Trainer(c)
    ckpt = Checkpointer(c.workdir)
    ckpt.save(1, trainer.create_state(0), None, resolved_config(c, trainer), {}, force=True)
    ckpt.close()
    files = export(c.workdir, "llada-hf", str(tmp_path / "out"),
                   tokenizer=tokenizers["extended"])
    ours = Tokenizer.load(tokenizers["extended"])
    out = tmp_path / "out"
    assert "generation_config.json" in files
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [
        ours.eos_id, ours.eot_id]
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eos_id and config["mask_token_id"] == 512
    hf = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert _chat_ids(hf, [{"role": "user", "content": "Hi"}]) == templates.turn_ids(
        ours, "chat", "Hi", first=True)
