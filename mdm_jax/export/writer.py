"""Write an mdm_jax checkpoint in a PyTorch layout: SMDM's lit-gpt layout, a LLaDA-style or a
Llama Hugging Face folder (`export()`; its command line is `python -m mdm_jax.export`).

    python -m mdm_jax.export --model runs/tiny_mdm --format litgpt --out exports/tiny_lit
    python -m mdm_jax.export --model runs/smdm_mdm_170M --step 18710 --format llada-hf \\
        --out exports/170M_llada --dtype bfloat16
    python -m mdm_jax.export --model runs/smdm_arm_170M --format llama-hf --out exports/arm

Each family lists the formats it exports to (families.py). The masked families export to
`litgpt` (lit_model.safetensors + lit_model.pth + config.json, a config that SMDM's `lit_gpt`
Config accepts as is) and `llada-hf` (LLaDA's layout and config, with its modeling code:
AutoModel.from_pretrained(out, trust_remote_code=True)); ARMs to `llama-hf`
(transformers.LlamaForCausalLM, no custom code). Hugging Face folders are sharded with an index
above --max-shard-size. Every export ships the tokenizer (tokenizer.model; HF formats also
tokenizer.json for AutoTokenizer, with the chat template of a chat tokenizer, and
generation_config.json) and `mdm_jax.json` with the preset, step, mask id, vocabulary and
tokenizer checksum, also kept in the safetensors metadata. Tensors are read from the
checkpoint and written one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from mdm_jax import families, storage
from mdm_jax.export.layouts import FORMATS, METADATA_FILE, Dims, tensor_names
from mdm_jax.export.tensor_io import DTYPES, ExportError, write_safetensors, write_sharded


def _metadata(src, args, fmt: str, dtype: str, tokenizer_path: str | None) -> dict:
    from mdm_jax.data.tokenizer import file_sha256

    c = src.config
    return {
        "format": fmt,
        "preset": c.model.preset,
        "family": args.family,
        "step": src.step,
        "vocab_size": args.vocab_size,
        "embedding_rows": args.embedding_rows,
        "mask_token_id": args.mask_id if families.get(args.family).mask_token else None,
        "seq_len": c.seq_len,
        "tokenizer": "tokenizer.model" if tokenizer_path else None,  # shipped beside
        "tokenizer_sha256": file_sha256(tokenizer_path) if tokenizer_path else None,
        "dtype": dtype,
        # the run's folder name and step, never this machine's path
        "source_checkpoint": f"{storage.as_path(src.workdir).name}/checkpoints/{src.step}",
    }


# SMDM's lit_gpt.config.Config dataclass fields (ML-GSAI/SMDM lit_gpt/config.py): its
# `Config(**json)` accepts nothing else (`head_size` is a property; RoPE's base is fixed at 10000).
SMDM_CONFIG_FIELDS = ("org", "name", "block_size", "vocab_size", "padding_multiple",
                      "padded_vocab_size", "n_layer", "n_head", "n_embd", "rotary_percentage",
                      "parallel_residual", "bias", "n_query_groups", "shared_attention_norm",
                      "_norm_class", "norm_eps", "_mlp_class", "intermediate_size",
                      "condense_ratio")
SMDM_ROPE_BASE = 10000.0


def smdm_name(preset: str) -> str:
    """SMDM's name for a Diff_LLaMA preset (`Config.from_name`), or an mdm_jax-only name."""
    from mdm_jax.presets import ALIASES, SMDM_PRESETS

    key = ALIASES.get(preset, preset)
    return f"Diff_LLaMA_{key}" if key in SMDM_PRESETS else f"mdm_jax_{preset}"


def _model_config(fmt: str, args, meta: dict, dtype: str, special: dict) -> dict:
    if fmt == "litgpt":
        # Every field that changes the computation is explicit (SMDM's defaults differ:
        # parallel_residual=True, bias=True, LayerNorm, GptNeoxMLP, rotary_percentage=0.25).
        # "RMSNorm" is SMDM's plain-torch norm; its presets name "FusedRMSNorm", the same
        # function as a CUDA kernel with the same weights.
        if args.rope_base != SMDM_ROPE_BASE:
            raise ExportError(f"SMDM's lit_gpt fixes RoPE's base at 10000; this model uses "
                              f"{args.rope_base}: export it as llada-hf instead")
        return {"name": smdm_name(meta["preset"]), "block_size": meta["seq_len"],
                "vocab_size": args.vocab_size, "padding_multiple": 64,
                "padded_vocab_size": args.vocab_size, "n_layer": args.n_layer,
                "n_head": args.n_head, "n_embd": args.d_model, "rotary_percentage": 1.0,
                "parallel_residual": False, "bias": False, "n_query_groups": args.n_head,
                "shared_attention_norm": False, "_norm_class": "RMSNorm",
                "norm_eps": args.norm_eps, "_mlp_class": "LLaMAMLP",
                "intermediate_size": args.mlp_dim, "condense_ratio": 1}
    if fmt == "llada-hf":
        # LLaDA's config.json with this model's sizes: LLaDA's code builds wte and the output
        # layer with `embedding_size or vocab_size` rows, and its mask id lies inside them.
        rows = args.embedding_rows
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                         "AutoModelForMaskedLM": "modeling_llada.LLaDAModelLM"},
            "d_model": args.d_model, "n_heads": args.n_head, "n_kv_heads": args.n_head,
            "n_layers": args.n_layer, "mlp_hidden_size": args.mlp_dim,
            "mlp_ratio": args.mlp_dim // args.d_model or 1,
            "vocab_size": rows, "embedding_size": rows, "mask_token_id": args.mask_id,
            "max_sequence_length": meta["seq_len"], "rope": True,
            "rope_theta": args.rope_base, "rope_full_precision": True,
            "rms_norm_eps": args.norm_eps, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "bias_for_layer_norm": False,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "activation_type": "silu", "block_type": "llama", "block_group_size": 1,
            "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
            "alibi": False, "alibi_bias_max": 8.0, "multi_query_attention": None,
            "flash_attention": False, "input_emb_norm": False, "scale_logits": False,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
            "init_device": "cpu", "init_fn": "mitchell", "init_std": 0.02,
            "init_cutoff_factor": None, "precision": "amp_bf16", "use_cache": False,
            "torch_dtype": dtype, **special}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.d_model, "intermediate_size": args.mlp_dim,
            "num_attention_heads": args.n_head, "num_key_value_heads": args.n_head,
            "num_hidden_layers": args.n_layer, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "max_position_embeddings": meta["seq_len"],
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_base},
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": dtype, "dtype": dtype, **special}


def _tokenizer(src, tokenizer: str | None) -> str | None:
    """The SentencePiece model to ship: --tokenizer, else the one the run trained with."""
    path = tokenizer or src.config.data.get("tokenizer", "")
    if path and os.path.isfile(path):
        return path
    if tokenizer:
        raise ExportError(f"--tokenizer {tokenizer}: no such file")
    print(f"warning: the run's tokenizer ({path or 'none recorded'}) is not here; the export "
          f"ships no tokenizer (pass --tokenizer PATH)", file=sys.stderr)
    return None


def export(checkpoint: str, fmt: str, out: str, step: int | None = None,
           dtype: str = "float32", max_shard_bytes: int = 5 * 10**9,
           tokenizer: str | None = None, overwrite: bool = False,
           hub_id: str | None = None, allow_nonfinite: bool = False) -> list[str]:
    """Write `fmt` to `out`; returns the files written. Streams tensor by tensor. The model
    card's usage lines load from `hub_id` (the Hub repository it is bound for), else from `out`
    as given. Weights that are not finite (a diverged or corrupt run) are refused unless
    `allow_nonfinite`.

    Everything is written into a temporary sibling folder that replaces `out` only when it is
    complete: an interrupted export leaves `out` as it was, and a re-export never mixes its
    files with an older one's. An `out` that holds files is refused unless `overwrite`."""
    given_out, out = out, os.path.abspath(out)
    if os.path.isfile(out):
        raise ExportError(f"--out {out} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        held = ", ".join(sorted(os.listdir(out))[:3])
        raise ExportError(f"--out {out} already holds files ({held}, ...); pass --overwrite to "
                          f"replace them, or choose another folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # a folder like any other, not mkdtemp's private 0700
    try:
        files = _export_into(checkpoint, fmt, staging, step, dtype, max_shard_bytes, tokenizer,
                             hub_id or given_out, allow_nonfinite)
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def _replace_folder(new: str, out: str) -> None:
    """Put the finished folder `new` at `out`, the old one (if any) removed after the swap."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(new, out)
    if old:
        shutil.rmtree(old)


def _export_into(checkpoint: str, fmt: str, out: str, step: int | None, dtype: str,
                 max_shard_bytes: int, tokenizer: str | None, card_repo: str,
                 allow_nonfinite: bool = False) -> list[str]:
    from mdm_jax.export.source import CheckpointParams
    from mdm_jax.model import ModelArgs

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    src = CheckpointParams(checkpoint, step)
    args = ModelArgs.from_config(src.config)
    family = families.get(args.family)
    family.check_export(fmt)  # the family's one-line refusal names the formats it has
    dims = Dims.from_args(args)
    tokenizer_path = _tokenizer(src, tokenizer)
    meta = _metadata(src, args, fmt, dtype, tokenizer_path)
    # Without a tokenizer the ids are unknown: None, never LLaDA's defaults (50256, out of range)
    special = {"eos_token_id": None, "pad_token_id": None}
    if tokenizer_path and fmt != "litgpt":
        from mdm_jax.export.tokenizer_files import special_ids

        ids = special_ids(tokenizer_path)
        # llada-hf's generate reads EOS and end-of-turn (LLaDA's end-token options) from here
        keys = ("bos_token_id", "eos_token_id", "pad_token_id") + \
            (("eot_token_id",) if fmt == "llada-hf" else ())
        special = {k: ids[k] for k in keys if ids[k] is not None}
    model_config = _model_config(fmt, args, meta, dtype, special)  # checks before writing

    def maker(name, entry, layer):
        def make():
            src.keep_only(entry.leaves)
            tensor = entry.to_torch(dims, *(src.leaf(x, layer) for x in entry.leaves))
            if not allow_nonfinite:
                _check_finite(name, tensor, src.step)
            return tensor
        return make

    tensors = [(name, entry.shape(dims), maker(name, entry, layer))
               for name, entry, layer in tensor_names(fmt, dims)]
    st_meta = {k: json.dumps(v) for k, v in meta.items()}
    if fmt == "litgpt":
        path = os.path.join(out, "lit_model.safetensors")
        write_safetensors(path, tensors, dtype, st_meta)
        src.keep_only(())
        _write_pth(path, os.path.join(out, "lit_model.pth"))
        files = ["lit_model.safetensors", "lit_model.pth"]
    else:
        files = write_sharded(out, tensors, dtype, st_meta, max_shard_bytes)
    if fmt == "llada-hf":  # the model's code travels with it (auto_map)
        from importlib import resources

        for name in ("configuration_llada.py", "modeling_llada.py", "generate.py"):
            source = resources.files("mdm_jax.export.llada_remote") / name
            with open(os.path.join(out, name), "w") as f:
                f.write(source.read_text())
            files.append(name)
    if tokenizer_path:
        from mdm_jax.export.tokenizer_files import write_tokenizer

        files += write_tokenizer(out, tokenizer_path, meta["mask_token_id"], hf=fmt != "litgpt",
                                 model_max_length=meta["seq_len"])
    if fmt != "litgpt":
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump(_generation_config(fmt, src.config, tokenizer_path), f, indent=2)
        files.append("generation_config.json")
    from mdm_jax.export.model_card import model_card

    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(meta, src.config, fmt, card_repo, src.workdir))
    files.append("README.md")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    # Every file's sha256, so an import can tell a folder whose files come from different
    # exports (or were changed since) from a whole one.
    from mdm_jax.data.tokenizer import file_sha256

    # The model card is left out: its owner is meant to edit it (the license, at least).
    meta["files"] = {name: file_sha256(os.path.join(out, name))
                     for name in sorted({*files, "config.json"} - {"README.md"})}
    with open(os.path.join(out, METADATA_FILE), "w") as f:  # mdm_jax's own record, last
        json.dump(meta, f, indent=2)
    return [*files, "config.json", METADATA_FILE]


def _check_finite(name: str, tensor, step: int) -> None:
    """Refuse NaN or infinite weights: exported, they would only fail later, elsewhere."""
    import numpy as np

    bad = int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
    if bad:
        raise ExportError(f"{name} holds {bad} non-finite value(s) at step {step} (a diverged "
                          f"or corrupt run): export an earlier --step, or pass "
                          f"--allow-nonfinite to write them anyway")


def _generation_config(fmt: str, config, tokenizer_path: str | None) -> dict:
    """generation_config.json: where generation stops (EOS, and end-of-turn for a chat model),
    the trained length, and for llada-hf the run's own sampling settings, the defaults of the
    folder's `generate` (those of `python -m mdm_jax.sample`)."""
    from mdm_jax.export.tokenizer_files import generation_config

    settings = {"max_length": config.seq_len}
    if tokenizer_path:
        settings.update(generation_config(tokenizer_path))
    if fmt == "llada-hf":
        settings.update(mdm_steps=config.samples.steps, mdm_remasking=config.samples.remasking,
                        mdm_temperature=config.samples.temperature, mdm_reveal_order="even")
    return settings


def _write_pth(safetensors_path: str, pth_path: str) -> None:
    """The same tensors as a torch state dict (SMDM's scripts call torch.load on it)."""
    import torch
    from safetensors.torch import load_file

    state_dict = load_file(safetensors_path)
    tmp = pth_path + ".partial"
    torch.save(state_dict, tmp)
    os.replace(tmp, pth_path)
