"""Export an mdm_jax checkpoint to PyTorch: SMDM's lit-gpt layout, a LLaDA-style or a Llama
Hugging Face folder.

    python -m mdm_jax.export --checkpoint runs/tiny_mdm --format litgpt --out exports/tiny_lit
    python -m mdm_jax.export --checkpoint runs/smdm_mdm_170M --step 18710 --format llada-hf \
        --out exports/170M_llada --dtype bfloat16
    python -m mdm_jax.export --checkpoint runs/smdm_arm_170M --format llama-hf --out exports/arm

MDMs export to `litgpt` (lit_model.safetensors + lit_model.pth + config.json) and `llada-hf`;
ARMs to `llama-hf` (loads with transformers.LlamaForCausalLM.from_pretrained, no custom code).
Hugging Face folders are sharded with an index above --max-shard-size. Every format records
the preset, step, mask id, vocabulary and tokenizer checksum in its config (`mdm_jax` key) and
in the safetensors metadata. Tensors are read from the checkpoint and written one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mdm_jax.export.layouts import FORMATS, Dims, tensor_names
from mdm_jax.export.tensor_io import DTYPES, ExportError, write_safetensors, write_sharded

MDM_FORMATS = ("litgpt", "llada-hf")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def _metadata(src, args, fmt: str, dtype: str) -> dict:
    c = src.config
    return {
        "format": fmt,
        "preset": c.model.preset,
        "family": "arm" if args.causal else "mdm",
        "step": src.step,
        "vocab_size": args.vocab_size,
        "embedding_rows": args.embedding_rows,
        "mask_token_id": None if args.causal else args.mask_id,
        "seq_len": c.seq_len,
        "tokenizer": c.data.get("tokenizer", "") or None,
        "tokenizer_sha256": src.tokenizer_sha256(),
        "dtype": dtype,
        "source_checkpoint": src.state_dir,
    }


def _model_config(fmt: str, args, meta: dict, dtype: str) -> dict:
    if fmt == "litgpt":  # lit-gpt Config field names
        return {"name": f"Diff_LLaMA_{meta['preset']}", "n_layer": args.n_layer,
                "n_head": args.n_head, "n_query_groups": args.n_head, "n_embd": args.d_model,
                "head_size": args.head_dim, "intermediate_size": args.mlp_dim,
                "vocab_size": args.vocab_size, "padded_vocab_size": args.embedding_rows,
                "block_size": meta["seq_len"], "rotary_percentage": 1.0, "bias": False,
                "norm_eps": args.norm_eps, "rope_base": args.rope_base,
                "_norm_class": "RMSNorm", "_mlp_class": "LLaMAMLP", "mdm_jax": meta}
    if fmt == "llada-hf":
        return {"architectures": ["LLaDAModelLM"], "model_type": "llada",
                "d_model": args.d_model, "n_heads": args.n_head, "n_kv_heads": args.n_head,
                "n_layers": args.n_layer, "mlp_hidden_size": args.mlp_dim,
                "vocab_size": args.vocab_size, "embedding_size": args.embedding_rows,
                "mask_token_id": args.mask_id, "max_sequence_length": meta["seq_len"],
                "rope": True, "rope_theta": args.rope_base, "rms_norm_eps": args.norm_eps,
                "layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama",
                "include_bias": False, "weight_tying": False, "alibi": False,
                "attention_layer_norm": False, "torch_dtype": dtype, "mdm_jax": meta}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.d_model, "intermediate_size": args.mlp_dim,
            "num_attention_heads": args.n_head, "num_key_value_heads": args.n_head,
            "num_hidden_layers": args.n_layer, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "max_position_embeddings": meta["seq_len"],
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_base},
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": dtype, "dtype": dtype, "mdm_jax": meta}


def export(checkpoint: str, fmt: str, out: str, step: int | None = None,
           dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write `fmt` to `out`; returns the files written. Streams tensor by tensor."""
    from mdm_jax import config as config_lib
    from mdm_jax.export.source import CheckpointParams

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    src = CheckpointParams(checkpoint, step)
    args = config_lib.model_args(src.config)
    if args.causal and fmt in MDM_FORMATS:
        raise ExportError(f"{checkpoint} is an ARM (objective.kind=arm); --format {fmt} holds "
                          f"MDMs. Use --format llama-hf.")
    if not args.causal and fmt == "llama-hf":
        raise ExportError(f"{checkpoint} is an MDM (bidirectional, with a mask-token row); "
                          f"--format llama-hf is for ARMs. Use --format litgpt or llada-hf.")
    dims = Dims.from_args(args)
    os.makedirs(out, exist_ok=True)
    meta = _metadata(src, args, fmt, dtype)

    def maker(entry, layer):
        def make():
            src.keep_only(entry.leaves)
            return entry.to_torch(dims, *(src.leaf(x, layer) for x in entry.leaves))
        return make

    tensors = [(name, entry.shape(dims), maker(entry, layer))
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
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(_model_config(fmt, args, meta, dtype), f, indent=2)
    return [*files, "config.json"]


def _write_pth(safetensors_path: str, pth_path: str) -> None:
    """The same tensors as a torch state dict (SMDM's scripts call torch.load on it)."""
    import torch
    from safetensors.torch import load_file

    state_dict = load_file(safetensors_path)
    tmp = pth_path + ".partial"
    torch.save(state_dict, tmp)
    os.replace(tmp, pth_path)


def cli(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mdm_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's workdir (or its checkpoints/STEP folder)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB",
                        help="Hugging Face formats: shard above this size (e.g. 5GB, 500MB)")
    a = parser.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    try:
        files = export(a.checkpoint, a.format, a.out, a.step, a.dtype,
                       parse_size(a.max_shard_size))
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.format} export to {a.out}: {', '.join(files)}")


if __name__ == "__main__":
    cli()
