"""A plain-PyTorch reference of the SMDM encoder, in lit-gpt's `TransEncoder` layout.

No flash-attn and no custom kernels: `torch.nn.functional.scaled_dot_product_attention`,
float32 RMSNorm statistics and rotate-half RoPE, exactly the architecture of mdm_jax.model, so
that `litgpt` exports (and `llada-hf` folders, converted on load) run in PyTorch as they do in
JAX. Bidirectional by default (the MDM); `causal=True` gives the ARM.

    from mdm_jax.export.torch_model import TransEncoder
    model = TransEncoder.from_export("exports/tiny_lit")     # or a llada-hf folder
    logits = model(torch.tensor([[mask_id] * 16]))            # [1, 16, vocab]
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

# One definition of the norm and RoPE for PyTorch: the code shipped in llada-hf exports.
from mdm_jax.export.llada_remote.modeling_llada import RMSNorm
from mdm_jax.export.llada_remote.modeling_llada import apply_rope as rope


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    n_layer: int
    n_head: int
    head_dim: int
    d_model: int
    mlp_dim: int
    vocab_size: int
    embedding_rows: int
    causal: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


class CausalSelfAttention(nn.Module):  # lit-gpt's name, also used for the bidirectional MDM
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        self.attn = nn.Linear(c.d_model, 3 * c.n_head * c.head_dim, bias=False)
        self.proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)

    def forward(self, x):
        b, length, _ = x.shape
        c = self.c
        qkv = self.attn(x).view(b, length, c.n_head, 3, c.head_dim)  # rows: [q_h; k_h; v_h]
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))  # [B, H, L, D]
        q, k = rope(q, c.rope_base), rope(k, c.rope_base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=c.causal)
        return self.proj(y.transpose(1, 2).reshape(b, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.w1 = nn.Linear(c.d_model, c.mlp_dim, bias=False)
        self.w2 = nn.Linear(c.d_model, c.mlp_dim, bias=False)
        self.w3 = nn.Linear(c.mlp_dim, c.d_model, bias=False)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LLaMAMLP(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.swiglu = SwiGLU(c)

    def forward(self, x):
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.norm_1 = RMSNorm(c.d_model, c.norm_eps)
        self.attn = CausalSelfAttention(c)
        self.norm_2 = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = LLaMAMLP(c)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class TransEncoder(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.embedding_rows, c.d_model),
            h=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
            ln_f=RMSNorm(c.d_model, c.norm_eps),
        ))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @classmethod
    def from_export(cls, path: str, dtype: torch.dtype = torch.float32) -> TransEncoder:
        """Load a `litgpt` export folder (safetensors, else the .pth) or a `llada-hf` folder."""
        from mdm_jax.export.layouts import Dims, read_leaves, tensor_names
        from mdm_jax.export.tensor_io import TensorReader

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        c = config_from_json(cfg)
        if cfg.get("model_type") == "llada":  # convert LLaDA names to the lit-gpt layout
            reader = TensorReader(path)
            dims = Dims(c.n_layer, c.n_head, c.head_dim, c.d_model, c.mlp_dim, c.vocab_size,
                        c.embedding_rows)
            leaves = read_leaves("llada-hf", reader.get, reader.keys(), dims, path)
            state = {name: torch.from_numpy(entry.to_torch(dims, *(
                leaves[(x, layer)] for x in entry.leaves)))
                for name, entry, layer in tensor_names("litgpt", dims)}
        else:
            st = os.path.join(path, "lit_model.safetensors")
            if os.path.exists(st):
                from safetensors.torch import load_file

                state = load_file(st)
            else:
                state = torch.load(os.path.join(path, "lit_model.pth"), map_location="cpu",
                                   weights_only=True)
        model = cls(c)
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()


def config_from_json(cfg: dict) -> EncoderConfig:
    """EncoderConfig from an export's config.json (SMDM lit-gpt or LLaDA field names).

    lit-gpt: `lm_head` has padded_vocab_size rows, `wte` one more (the mask token); RoPE's base
    is SMDM's fixed 10000. LLaDA: both have embedding_size rows, the last (mask) row of the
    output layer zero, so the model's vocabulary is one less."""
    if cfg.get("model_type") == "llada":
        rows = cfg.get("embedding_size") or cfg["vocab_size"]
        return EncoderConfig(
            n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
            head_dim=cfg["d_model"] // cfg["n_heads"], d_model=cfg["d_model"],
            mlp_dim=cfg["mlp_hidden_size"], vocab_size=rows - 1, embedding_rows=rows,
            rope_base=cfg["rope_theta"], norm_eps=cfg["rms_norm_eps"])
    return EncoderConfig(
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], head_dim=cfg["n_embd"] // cfg["n_head"],
        d_model=cfg["n_embd"], mlp_dim=cfg["intermediate_size"],
        vocab_size=cfg["padded_vocab_size"], embedding_rows=cfg["padded_vocab_size"] + 1,
        rope_base=10000.0, norm_eps=cfg["norm_eps"])
