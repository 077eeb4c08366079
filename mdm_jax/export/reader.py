"""Read an export folder (litgpt, llada-hf or llama-hf) back into an mdm_jax parameter tree.

`detect_format` tells a folder's layout from its files; `read_export` returns the run config it
implies (preset, family, vocabulary, sequence length, tokenizer) and float32 numpy parameters.
Files exported by mdm_jax carry their preset, family and step, and every file they recorded is
checked first; for other files the preset is found from the tensor shapes (or given). Only
safetensors or `torch.load(weights_only=True)` are read: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from mdm_jax import families
from mdm_jax.export.layouts import FORMATS, METADATA_FILE, Dims, params_tree, read_leaves
from mdm_jax.export.tensor_io import ExportError, TensorReader

# The family a format holds when its files do not say (exports by mdm_jax record theirs).
FORMAT_FAMILIES = {"litgpt": "mdm", "llada-hf": "mdm", "llama-hf": "arm"}


def _find_preset(fmt: str, keys: set[str], get, hf_config: dict) -> str:
    """The preset whose shapes match the tensors: layers, width, MLP width and vocabulary."""
    from mdm_jax.presets import PRESETS

    prefix = {"litgpt": ("transformer.h.", "transformer.wte.weight"),
              "llada-hf": ("model.transformer.blocks.", "model.transformer.wte.weight"),
              "llama-hf": ("model.layers.", "model.embed_tokens.weight")}[fmt]
    layers = {k[len(prefix[0]):].split(".")[0] for k in keys if k.startswith(prefix[0])}
    n_layer = len(layers)
    if prefix[1] not in keys:
        raise ExportError(f"no {prefix[1]} tensor: is this a {fmt} checkpoint?")
    d_model = get(prefix[1]).shape[1]
    n_head = hf_config.get("n_heads") or hf_config.get("num_attention_heads")
    matches = [name for name, p in PRESETS.items()
               if (p.n_layer, p.d_model) == (n_layer, d_model)
               and (n_head is None or p.n_head == n_head)]
    if len(matches) != 1:
        raise ExportError(
            f"cannot tell the preset from the shapes ({n_layer} layers, width {d_model}): "
            f"{'candidates ' + ', '.join(matches) if matches else 'no preset matches'}; pass "
            f"--preset NAME")
    return matches[0]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}; fix or remove the file") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or "
                          f"remove the file")
    return value


def check_export_files(folder: str, meta: dict) -> None:
    """Every file an mdm_jax export recorded is there, unchanged, and of the same step: a
    folder mixing two exports (or one cut short) is refused instead of mislabelled."""
    from safetensors import safe_open

    from mdm_jax.data.tokenizer import file_sha256

    for name, sha in meta.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ExportError(f"{folder} lacks {name}, which its {METADATA_FILE} lists: the "
                              f"export is incomplete; export again")
        if file_sha256(path) != sha:
            raise ExportError(f"{path} differs from the file its export wrote ({METADATA_FILE} "
                              f"records another sha256): the folder mixes files of different "
                              f"exports or was changed; export again into an empty folder")
        if name.endswith(".safetensors"):
            with safe_open(path, framework="numpy") as f:
                recorded = (f.metadata() or {}).get("step")
            if recorded is not None and json.loads(recorded) != meta.get("step"):
                raise ExportError(f"{path} holds step {recorded} but {METADATA_FILE} says step "
                                  f"{meta.get('step')}; export again into an empty folder")


@dataclasses.dataclass
class ExportContents:
    """An export read back: the run config it implies, its parameters as an mdm_jax tree of
    float32 numpy arrays, its step and its metadata."""

    config: ml_collections.ConfigDict
    params: dict
    step: int
    meta: dict
    format: str
    src: str


def detect_format(folder: str) -> str | None:
    """The layout of an export folder from its files, or None if it is not one."""
    if any(os.path.exists(os.path.join(folder, n))
           for n in ("lit_model.safetensors", "lit_model.pth")):
        return "litgpt"
    if os.path.exists(os.path.join(folder, "config.json")):
        model_type = _read_json(os.path.join(folder, "config.json")).get("model_type")
        return {"llada": "llada-hf", "llama": "llama-hf"}.get(model_type)
    return None


def read_export(src: str, fmt: str | None = None, preset: str | None = None,
                step: int | None = None, seq_len: int | None = None) -> ExportContents:
    """Read an export folder (or one .safetensors / .pth file) in layout `fmt` (detected from
    the folder when None); every file an mdm_jax export recorded is checked first."""
    from mdm_jax import config as config_lib
    from mdm_jax.model import ModelArgs
    from mdm_jax.presets import get_preset

    if not os.path.exists(src):
        raise ExportError(f"{src} does not exist; give an export folder, a .safetensors file "
                          f"or a .pth state dict")
    fmt = fmt or (detect_format(src) if os.path.isdir(src) else None)
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} for {src}; valid: {', '.join(FORMATS)} (pass "
                          f"--format)")
    hf_config, meta = {}, {}
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    if os.path.exists(os.path.join(folder, "config.json")):
        hf_config = _read_json(os.path.join(folder, "config.json"))
        meta = hf_config.get("mdm_jax", {})  # exports before mdm_jax.json existed
    if os.path.exists(os.path.join(folder, METADATA_FILE)):
        meta = _read_json(os.path.join(folder, METADATA_FILE))
        check_export_files(folder, meta)
    if fmt == "litgpt" and os.path.isdir(src):
        names = [n for n in ("lit_model.safetensors", "lit_model.pth")
                 if os.path.exists(os.path.join(src, n))]
        if not names:
            raise ExportError(f"{src} holds neither lit_model.safetensors nor lit_model.pth")
        src = os.path.join(src, names[0])
    reader = TensorReader(src)
    keys = reader.keys()
    preset = preset or meta.get("preset") or _find_preset(fmt, keys, reader.get, hf_config)
    c = config_lib.base_config()
    c.model.preset = preset
    c.objective.kind = meta.get("family") or FORMAT_FAMILIES[fmt]
    families.get(c.objective.kind).check_export(fmt)  # a folder whose files disagree
    c.model.vocab_size = int(meta.get("vocab_size") or 0)
    if not c.model.vocab_size:  # from the head: [vocab, d]; LLaDA's has the mask row too
        head = {"litgpt": "lm_head.weight", "llada-hf": "model.transformer.ff_out.weight",
                "llama-hf": "lm_head.weight"}[fmt]
        if head in keys:
            c.model.vocab_size = int(reader.get(head).shape[0]) - (fmt == "llada-hf")
    try:
        p = get_preset(preset)
    except ValueError as e:
        raise ExportError(str(e)) from None
    c.seq_len = int(seq_len or meta.get("seq_len") or p.max_seq_len)
    c.model.dtype = "float32"
    c.global_batch, c.micro_batch = 1, 0  # only shapes matter here; training sets its own
    shipped = os.path.join(folder, "tokenizer.model")
    if os.path.exists(shipped):  # every export ships its tokenizer
        c.data.tokenizer = os.path.abspath(shipped)
    elif meta.get("tokenizer") and os.path.isabs(meta["tokenizer"]):
        c.data.tokenizer = meta["tokenizer"]
    args = ModelArgs.from_config(c)
    dims = Dims.from_args(args)
    leaves = read_leaves(fmt, reader.get, keys, dims, src)
    params = params_tree(leaves, dims, scanned=args.scan_layers)
    step = int(step if step is not None else meta.get("step") or 0)
    return ExportContents(config=c, params=params, step=step, meta=meta, format=fmt, src=src)
