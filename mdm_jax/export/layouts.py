"""Where each mdm_jax parameter goes in the PyTorch layouts (shared/REFERENCE.md section 6).

mdm_jax keeps attention weights per head (`wq [d, H, hd]`, `wo [H, hd, d]`) and dense kernels as
[in, out]; PyTorch's Linear stores [out, in]. Each layout is a table of entries: the tensor name
(with `{i}` for the layer), the mdm_jax leaves it is made from, the conversion both ways and the
PyTorch shape. Conversions are pure numpy and exact (transposes and reshapes only).

- litgpt: SMDM's `TransEncoder` state dict. Q, K and V are fused into one [3 d, d] matrix whose
  rows run head by head as [q_h; k_h; v_h] (head_dim rows each).
- llada-hf: LLaDA's Hugging Face layout (`model.transformer.blocks.{i}.q_proj`, ...); its output
  layer `ff_out` has one row per embedding row, the mask token's row zero.
- llama-hf: Hugging Face `LlamaForCausalLM` (rotate-half RoPE like ours: no permutation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

FORMATS = ("litgpt", "llada-hf", "llama-hf")
METADATA_FILE = "mdm_jax.json"  # an export's own record: preset, family, step, mask id, ...


@dataclasses.dataclass(frozen=True)
class Dims:
    n_layer: int
    n_head: int
    head_dim: int
    d_model: int
    mlp_dim: int
    vocab_size: int  # logits the head produces
    embedding_rows: int  # vocab + 1 for the MDM's mask token

    @classmethod
    def from_args(cls, args) -> Dims:
        return cls(args.n_layer, args.n_head, args.head_dim, args.d_model, args.mlp_dim,
                   args.vocab_size, args.embedding_rows)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # torch name; "{i}" is the layer index for per-layer entries
    leaves: tuple[str, ...]  # mdm_jax leaf paths ("wq", "attn_norm/scale", "embedding", ...)
    to_torch: Callable  # (dims, *leaf arrays) -> torch-layout array
    from_torch: Callable  # (dims, array) -> tuple of leaf arrays
    shape: Callable  # dims -> torch shape

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def _same(dims, x):
    return x


def _same_back(dims, x):
    return (x,)


def _t(dims, x):  # [in, out] <-> [out, in]
    return _c(x.T)


def _t_back(dims, x):
    return (_c(x.T),)


def _heads_to(dims, w):  # [d, H, hd] -> [H*hd, d]
    return _c(w.reshape(w.shape[0], -1).T)


def _heads_from(dims, w):
    return (_c(w.T.reshape(-1, dims.n_head, dims.head_dim)),)


def _out_to(dims, w):  # [H, hd, d] -> [d, H*hd]
    return _c(w.reshape(-1, w.shape[-1]).T)


def _out_from(dims, w):
    return (_c(w.T.reshape(dims.n_head, dims.head_dim, -1)),)


def _qkv_to(dims, wq, wk, wv):  # 3 x [d, H, hd] -> [3*H*hd, d], rows [q_h; k_h; v_h] per head
    per_head = np.stack([w.transpose(1, 2, 0) for w in (wq, wk, wv)], axis=1)  # [H, 3, hd, d]
    return _c(per_head.reshape(-1, wq.shape[0]))


def _qkv_from(dims, w):
    per_head = w.reshape(dims.n_head, 3, dims.head_dim, -1)
    return tuple(_c(per_head[:, j].transpose(2, 0, 1)) for j in range(3))


def _attn_shape(d):
    return (d.n_head * d.head_dim, d.d_model)


def _norm(name, leaf):
    return Entry(name, (leaf,), _same, _same_back, lambda d: (d.d_model,))


def _proj(name, leaf):
    return Entry(name, (leaf,), _heads_to, _heads_from, _attn_shape)


def _out(name):
    return Entry(name, ("wo",), _out_to, _out_from, lambda d: (d.d_model, d.n_head * d.head_dim))


def _up(name, leaf):  # w1 / w2: [d, I] -> [I, d]
    return Entry(name, (leaf,), _t, _t_back, lambda d: (d.mlp_dim, d.d_model))


def _down(name):  # w3: [I, d] -> [d, I]
    return Entry(name, ("w3",), _t, _t_back, lambda d: (d.d_model, d.mlp_dim))


def _embedding(name):
    return Entry(name, ("embedding",), _same, _same_back,
                 lambda d: (d.embedding_rows, d.d_model))


def _head(name):
    return Entry(name, ("head",), _t, _t_back, lambda d: (d.vocab_size, d.d_model))


def _padded_head_to(dims, w):  # [d, vocab] -> [embedding_rows, d], the mask token's row zero
    out = np.zeros((dims.embedding_rows, w.shape[0]), w.dtype)
    out[: w.shape[1]] = w.T
    return out


def _padded_head_from(dims, w):
    if np.any(w[dims.vocab_size:] != 0):
        from mdm_jax.export.tensor_io import ExportError

        raise ExportError(f"the output layer's rows {dims.vocab_size}.. (the mask token's) are "
                          f"not zero: an mdm_jax model never predicts the mask token, so this "
                          f"head cannot be imported without changing the model")
    return (_c(w[: dims.vocab_size].T),)


def _padded_head(name):
    """LLaDA's output layer has `embedding_size` rows, one per embedding row: the mask token's
    row is zero, so its logit is always 0 (the softmax sees one extra logit of 0)."""
    return Entry(name, ("head",), _padded_head_to, _padded_head_from,
                 lambda d: (d.embedding_rows, d.d_model))


_LIT = "transformer.h.{i}."
_LLADA = "model.transformer.blocks.{i}."
_LLAMA = "model.layers.{i}."

LAYOUTS: dict[str, list[Entry]] = {
    "litgpt": [
        _embedding("transformer.wte.weight"),
        _norm(_LIT + "norm_1.weight", "attn_norm/scale"),
        Entry(_LIT + "attn.attn.weight", ("wq", "wk", "wv"), _qkv_to, _qkv_from,
              lambda d: (3 * d.n_head * d.head_dim, d.d_model)),
        _out(_LIT + "attn.proj.weight"),
        _norm(_LIT + "norm_2.weight", "mlp_norm/scale"),
        _up(_LIT + "mlp.swiglu.w1.weight", "w1"),
        _up(_LIT + "mlp.swiglu.w2.weight", "w2"),
        _down(_LIT + "mlp.swiglu.w3.weight"),
        _norm("transformer.ln_f.weight", "final_norm/scale"),
        _head("lm_head.weight"),
    ],
    "llada-hf": [
        _embedding("model.transformer.wte.weight"),
        _norm(_LLADA + "attn_norm.weight", "attn_norm/scale"),
        _proj(_LLADA + "q_proj.weight", "wq"),
        _proj(_LLADA + "k_proj.weight", "wk"),
        _proj(_LLADA + "v_proj.weight", "wv"),
        _out(_LLADA + "attn_out.weight"),
        _norm(_LLADA + "ff_norm.weight", "mlp_norm/scale"),
        _up(_LLADA + "ff_proj.weight", "w1"),  # LLaDA: ff_out(silu(ff_proj x) * up_proj x)
        _up(_LLADA + "up_proj.weight", "w2"),
        _down(_LLADA + "ff_out.weight"),
        _norm("model.transformer.ln_f.weight", "final_norm/scale"),
        _padded_head("model.transformer.ff_out.weight"),
    ],
    "llama-hf": [
        _embedding("model.embed_tokens.weight"),
        _norm(_LLAMA + "input_layernorm.weight", "attn_norm/scale"),
        _proj(_LLAMA + "self_attn.q_proj.weight", "wq"),
        _proj(_LLAMA + "self_attn.k_proj.weight", "wk"),
        _proj(_LLAMA + "self_attn.v_proj.weight", "wv"),
        _out(_LLAMA + "self_attn.o_proj.weight"),
        _norm(_LLAMA + "post_attention_layernorm.weight", "mlp_norm/scale"),
        _up(_LLAMA + "mlp.gate_proj.weight", "w1"),  # down(silu(gate x) * up x)
        _up(_LLAMA + "mlp.up_proj.weight", "w2"),
        _down(_LLAMA + "mlp.down_proj.weight"),
        _norm("model.norm.weight", "final_norm/scale"),
        _head("lm_head.weight"),
    ],
}


def tensor_names(fmt: str, dims: Dims) -> list[tuple[str, Entry, int | None]]:
    """(torch name, entry, layer or None) for every tensor of the layout, entry by entry (so a
    streaming writer needs only one entry's leaves in memory at a time)."""
    out = []
    for entry in LAYOUTS[fmt]:
        if entry.per_layer:
            out += [(entry.name.format(i=i), entry, i) for i in range(dims.n_layer)]
        else:
            out.append((entry.name, entry, None))
    return out


def read_leaves(fmt: str, get: Callable[[str], np.ndarray], keys: set[str], dims: Dims,
                source: str) -> dict[tuple[str, int | None], np.ndarray]:
    """{(leaf, layer): array} from a layout's tensors, after checking every name and shape.

    Errors name the tensor, the expected and the found shape; missing and unexpected tensors
    are listed (nothing is dropped silently)."""
    from mdm_jax.export.tensor_io import ExportError

    names = tensor_names(fmt, dims)
    expected = {name for name, _, _ in names}
    missing = sorted(expected - keys)
    if missing:
        raise ExportError(f"{source} lacks {len(missing)} tensor(s) of the {fmt} layout for "
                          f"this model ({dims.n_layer} layers), e.g. {', '.join(missing[:3])}")
    extra = sorted(keys - expected)
    if extra:
        raise ExportError(f"{source} has {len(extra)} tensor(s) the {fmt} layout does not "
                          f"define, e.g. {', '.join(extra[:3])}; is it a different layout or "
                          f"a model with more layers?")
    out = {}
    for name, entry, layer in names:
        array = get(name)
        want = tuple(entry.shape(dims))
        if tuple(array.shape) != want:
            raise ExportError(f"{source}: tensor {name} has shape {tuple(array.shape)}, "
                              f"expected {want}")
        values = entry.from_torch(dims, array.astype(np.float32, copy=False))
        for leaf, value in zip(entry.leaves, values, strict=True):
            out[(leaf, layer)] = value
    return out


def params_tree(leaves: dict[tuple[str, int | None], np.ndarray], dims: Dims,
                scanned: bool = True) -> dict:
    """The mdm_jax parameter tree (nn.scan layout: per-layer leaves stacked on axis 0).
    Consumes `leaves`: each layer's array is dropped once stacked, so the stacking never holds
    two copies of the model."""
    tree: dict = {}

    def put(node: dict, path: list[str], value) -> None:
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    per_layer = sorted({leaf for leaf, layer in leaves if layer is not None})
    for leaf in per_layer:
        layers = [leaves.pop((leaf, i)) for i in range(dims.n_layer)]
        if scanned:
            put(tree, ["blocks", *leaf.split("/")], np.stack(layers))
        else:
            for i, value in enumerate(layers):
                put(tree, [f"block_{i}", *leaf.split("/")], value)
    for (leaf, _), value in leaves.items():  # the global leaves: all that is left
        put(tree, leaf.split("/"), value)
    return tree
