"""The tokenizer that travels with every export.

Every format gets the SentencePiece `tokenizer.model` itself. Hugging Face formats also get
`tokenizer.json` + `tokenizer_config.json`, so that `AutoTokenizer.from_pretrained(folder)`
encodes exactly as SentencePiece does (and as mdm_jax did when it prepared the data). They are
built with `tokenizers` straight from the model proto, without transformers (its slow-to-fast
conversion costs seconds of imports, and time quadratic in the user-defined pieces: 30 s for
20,000), with the vocabulary, merges and added tokens that conversion gives, and:
- no BOS/EOS added on encode (mdm_jax's documents are ids + EOS, added by the data pipeline);
- SentencePiece's dummy prefix always prepended. transformers' own Llama conversion uses a
  Metaspace pre-tokenizer that skips the prefix when the text already starts with a space
  (" a" then loses a "▁"), so the normalizer here is Prepend("▁") + Replace(" ", "▁"), the
  exact SentencePiece behaviour for its identity normalisation;
- the MDM's mask token (`<|mdm_mask|>`) as a special token whose id is the model's mask id
  (placeholder tokens fill any gap between the tokenizer's vocabulary and the mask id);
- for a tokenizer with the chat pieces (`mdm_jax.data.tokenizer.CHAT_PIECES`): those pieces as
  special tokens at their SentencePiece ids, matched inside the text as SentencePiece matches
  them, and a `chat_template` that gives the ids of `mdm_jax.data.templates` ("chat").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from mdm_jax.data.tokenizer import CHAT_PIECES, END_OF_TURN, HEADER_END, HEADER_START, Tokenizer

MASK_TOKEN = "<|mdm_mask|>"

# mdm_jax.data.templates' "chat" dialogue as one text. mdm_jax encodes each user turn (BOS
# first) and each answer separately, every piece with SentencePiece's dummy prefix "▁": here a
# turn after an answer and every answer start with a space, the "▁" of their own encode (the
# text after BOS gets it from the tokenizer). So the rendered text tokenises to the ids the
# model was fine-tuned on and the prompts of a chat session (multi-turn included).
CHAT_TEMPLATE = (
    f"{{% set hs, he, eot = '{HEADER_START}', '{HEADER_END}', '{END_OF_TURN}' %}}"
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ hs + 'assistant' + he + '\\n\\n ' + (message['content'] | trim) + eot }}"
    "{% else %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ ' ' }}"
    "{% endif %}"
    "{{ hs + message['role'] + he + '\\n\\n' + (message['content'] | trim) + eot }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ hs + 'assistant' + he + '\\n\\n' }}{% endif %}")


def special_ids(tokenizer_path: str) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of a SentencePiece model (pad falls back to EOS), and its chat
    template's end-of-turn id (None without the chat pieces)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def valid(i: int) -> int | None:
        return i if i >= 0 else None

    eos = valid(sp.eos_id())
    return {"bos_token_id": valid(sp.bos_id()), "eos_token_id": eos,
            "pad_token_id": valid(sp.pad_id()) if sp.pad_id() >= 0 else eos,
            "unk_token_id": valid(sp.unk_id()), "vocab_size": sp.get_piece_size(),
            "eot_token_id": _chat_ids(tokenizer_path).get(END_OF_TURN)}


def _chat_ids(tokenizer_path: str) -> dict[str, int]:
    """{chat piece: id} of a tokenizer that has all of them, else {}."""
    tok = Tokenizer.load(tokenizer_path)
    return {p: tok.piece_id(p) for p in CHAT_PIECES} if tok.has_chat_pieces else {}


def generation_config(tokenizer_path: str) -> dict[str, int | list[int]]:
    """generation_config.json: generation stops at EOS and, with the chat pieces, also at the
    end of a turn (a chat answer ends with end-of-turn, then EOS)."""
    ids = special_ids(tokenizer_path)
    stop = [i for i in (ids["eos_token_id"], ids["eot_token_id"]) if i is not None]
    config = {"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
              "eos_token_id": stop if len(stop) > 1 else stop[0]}
    return {k: v for k, v in config.items() if v is not None}


def write_tokenizer(out: str, tokenizer_path: str, mask_id: int | None, hf: bool,
                    model_max_length: int | None = None) -> list[str]:
    """Copy the SentencePiece model into `out`; for HF formats also write the fast tokenizer
    (its model_max_length the trained sequence length). Returns the files written."""
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.model"))
    if not hf:
        return ["tokenizer.model"]
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("warning: tokenizers is not installed (the torch extra): the export ships "
              "tokenizer.model but no tokenizer.json for AutoTokenizer", file=sys.stderr)
        return ["tokenizer.model"]
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(tokenizer_path, "rb") as f:
        proto.ParseFromString(f.read())
    chat = _chat_ids(tokenizer_path)
    tok = _fast_tokenizer(proto, chat, mask_id)
    tok.save(os.path.join(out, "tokenizer.json"))
    spec, types = proto.trainer_spec, model_pb2.ModelProto.SentencePiece
    pieces = proto.pieces

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    # transformers loads tokenizer.json as it is (PreTrainedTokenizerFast, no conversion); the
    # special tokens are those transformers' SentencePiece conversion names.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
              "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id),
              "unk_token": piece(spec.unk_id),
              "pad_token": piece(spec.pad_id) or piece(spec.eos_id),
              "mask_token": MASK_TOKEN if mask_id is not None else None,
              "extra_special_tokens": [p.piece for p in pieces
                                       if p.type in (types.CONTROL, types.USER_DEFINED)],
              "clean_up_tokenization_spaces": False,
              # else transformers' "no limit"
              "model_max_length": model_max_length or None,
              "chat_template": CHAT_TEMPLATE if chat else None}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)
    return ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def _fast_tokenizer(proto, chat: dict[str, int], mask_id: int | None):
    """The `tokenizers` BPE tokenizer of a SentencePiece model proto: the vocabulary, merges
    and added tokens of transformers' Llama conversion, with this module's normaliser and
    decoder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    types = type(proto).SentencePiece
    pieces = [p.piece for p in proto.pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    # transformers' merges (its generate_merges, whose sorts come down to this order): every
    # split of a piece into two pieces, ranked by the piece's id, then by the left part's
    # length.
    merges = [(p[:i], p[i:]) for p in pieces for i in range(1, len(p))
              if p[:i] in vocab and p[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = normalizers.Prepend("▁")
    if chat:
        # SentencePiece matches its user-defined pieces inside the text, one dummy prefix per
        # text. As non-normalised added tokens (transformers' conversion) they would split the
        # text first and each part would get its own "▁"; as normalised ones they are matched
        # in the normalised text. The normaliser also rewrites those tokens' own text, so the
        # prefix skips a text that is exactly one chat piece (else a piece would only match
        # after a "▁"): the one difference left, such a text alone gets no "▁".
        alternatives = "|".join(map(re.escape, chat))
        prefix = normalizers.Replace(Regex(rf"\A(?!(?:{alternatives})\z)"), "▁")
    tok.normalizer = normalizers.Sequence([prefix, normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])

    def added(content: str, special: bool, normalized: bool = False) -> AddedToken:
        return AddedToken(content, special=special, normalized=normalized)

    # The pieces SentencePiece never splits; chat pieces special (skip_special_tokens drops
    # them from decoded answers) and normalised (see above).
    fixed = [added(p.piece, p.piece in chat or p.type != types.USER_DEFINED, p.piece in chat)
             for p in proto.pieces
             if p.type in (types.UNKNOWN, types.CONTROL, types.USER_DEFINED)]
    tok.add_tokens(fixed)
    assert [tok.token_to_id(p) for p in chat] == list(chat.values())
    if mask_id is not None:
        gap = mask_id - tok.get_vocab_size(with_added_tokens=True)
        if gap < 0:
            raise ValueError(f"the tokenizer has {mask_id - gap} tokens, more than the mask id "
                             f"{mask_id}: it does not belong to this model")
        tok.add_tokens([added(f"<|mdm_unused_{i}|>", True) for i in range(gap)]
                       + [added(MASK_TOKEN, True)])
        assert tok.token_to_id(MASK_TOKEN) == mask_id
    return tok
