"""The tokenizer that travels with every export.

Every format gets the SentencePiece `tokenizer.model` itself. Hugging Face formats also get
`tokenizer.json` + `tokenizer_config.json`, so that `AutoTokenizer.from_pretrained(folder)`
encodes exactly as SentencePiece does (and as mdm_jax did when it prepared the data):
- no BOS/EOS added on encode (mdm_jax's documents are ids + EOS, added by the data pipeline);
- SentencePiece's dummy prefix always prepended. transformers' own Llama conversion uses a
  Metaspace pre-tokenizer that skips the prefix when the text already starts with a space
  (" a" then loses a "▁"), so the normalizer here is Prepend("▁") + Replace(" ", "▁"), the
  exact SentencePiece behaviour for its identity normalisation;
- the MDM's mask token (`<|mdm_mask|>`) as a special token whose id is the model's mask id
  (placeholder tokens fill any gap between the tokenizer's vocabulary and the mask id).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

MASK_TOKEN = "<|mdm_mask|>"


def special_ids(tokenizer_path: str) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of a SentencePiece model (pad falls back to EOS)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def valid(i: int) -> int | None:
        return i if i >= 0 else None

    eos = valid(sp.eos_id())
    return {"bos_token_id": valid(sp.bos_id()), "eos_token_id": eos,
            "pad_token_id": valid(sp.pad_id()) if sp.pad_id() >= 0 else eos,
            "unk_token_id": valid(sp.unk_id()), "vocab_size": sp.get_piece_size()}


def write_tokenizer(out: str, tokenizer_path: str, mask_id: int | None, hf: bool) -> list[str]:
    """Copy the SentencePiece model into `out`; for HF formats also write the fast tokenizer.
    Returns the files written."""
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.model"))
    if not hf:
        return ["tokenizer.model"]
    import sentencepiece as spm

    try:
        import transformers
        from tokenizers import decoders, normalizers
    except ImportError:
        print("warning: transformers is not installed (the torch extra): the export ships "
              "tokenizer.model but no tokenizer.json for AutoTokenizer", file=sys.stderr)
        return ["tokenizer.model"]
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                "add_eos_token": False, "legacy": True, "bos_token": piece(sp.bos_id()),
                "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                "pad_token": piece(sp.pad_id()) or piece(sp.eos_id())}
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts from this folder
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in settings.items() if v is not None}, f)
        tok = transformers.AutoTokenizer.from_pretrained(tmp)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if mask_id is not None:
        gap = mask_id - len(tok)
        if gap < 0:
            raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the mask id "
                             f"{mask_id}: it does not belong to this model")
        tok.add_tokens([f"<|mdm_unused_{i}|>" for i in range(gap)], special_tokens=True)
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
        assert tok.mask_token_id == mask_id
    tok.save_pretrained(out)
    # The fast tokenizer.json is the whole definition: load it as such, not re-converted.
    config_path = os.path.join(out, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return sorted({"tokenizer.model", *(n for n in os.listdir(out) if n.startswith(
        ("tokenizer", "special_tokens")))})
