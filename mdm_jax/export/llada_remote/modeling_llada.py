"""A bidirectional Llama-style encoder in LLaDA's layout, for mdm_jax's `llada-hf` exports.

Same weight names and shapes as LLaDA's `LLaDAModelLM` (`model.transformer.wte`, `.blocks.{i}.
{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}`, `.ln_f`, `.ff_out`)
and the same computation for this configuration: pre-norm RMSNorm (weight only), rotate-half
RoPE in float32, full (bidirectional) attention, `ff_out(silu(ff_proj x) * up_proj x)`, an
untied output layer with `embedding_size` rows. Unlike LLaDA's code, `attention_mask` (1 = keep)
masks padded keys.

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    logits = model(input_ids).logits            # [B, L, embedding_size]
    out = model.generate(input_ids, gen_length=64)   # generate.py: LLaDA's sampler
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig
from .generate import generate as diffusion_generate

_SUPPORTED = {"activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms",
              "rope": True, "alibi": False, "include_bias": False, "weight_tying": False}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def apply_rope(x, theta):
    """Rotate-half RoPE on [B, H, L, D], computed in float32."""
    d, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = torch.arange(length, dtype=torch.float32, device=x.device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    xf = x.float()
    rotated = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], dim=-1)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        head_dim = c.d_model // c.n_heads
        self.n_heads, self.n_kv_heads, self.theta = c.n_heads, c.n_kv_heads, c.rope_theta
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(c.n_heads * head_dim, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)

    def forward(self, x, key_mask):
        b, length, _ = x.shape
        h = self.attn_norm(x)

        def heads(t, n):
            return t.view(b, length, n, -1).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(h), self.n_heads), self.theta)
        k = apply_rope(heads(self.k_proj(h), self.n_kv_heads), self.theta)
        v = heads(self.v_proj(h), self.n_kv_heads)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        rows = c.embedding_size or c.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, c.d_model),
            blocks=nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
            ln_f=RMSNorm(c.d_model, c.rms_norm_eps),
            ff_out=nn.Linear(c.d_model, rows, bias=False)))

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        key_mask = None
        if attention_mask is not None:  # [B, L] 1 = attend -> [B, 1, 1, L] boolean
            key_mask = attention_mask.bool()[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, key_mask)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config):
        super().__init__(config)
        for field, value in _SUPPORTED.items():
            if getattr(config, field, value) != value:
                raise ValueError(f"config.{field}={getattr(config, field)!r}: this model "
                                 f"implements {field}={value!r} only (mdm_jax exports)")
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @classmethod
    def can_generate(cls):  # so that from_pretrained reads generation_config.json
        return True

    def generate(self, input_ids, attention_mask=None, **options):
        """The reverse diffusion process, not transformers' left-to-right decoding: see
        generate.py for the options (LLaDA's) and their defaults."""
        return diffusion_generate(self, input_ids, attention_mask=attention_mask, **options)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def forward(self, input_ids, attention_mask=None, return_dict=True, **kwargs):
        logits = self.model(input_ids, attention_mask)
        return MaskedLMOutput(logits=logits) if return_dict else (logits,)
