"""A plain-PyTorch train step of the same model, loss and optimizer, to measure mdm_jax against.

The model is mdm_jax's PyTorch reference encoder (`mdm_jax/export/torch_model.py`: lit-gpt's
`TransEncoder` layout with SDPA attention, the architecture SMDM trains) built from the same
preset; the loss is SMDM's as its training script writes it (materialised [B, L, V] logits,
mask w.p. p = (1 - eps) t + eps, CE on masked tokens / p, summed and divided by B * L; the ARM:
mean next-token CE); the optimizer is `torch.optim.AdamW` (foreach) after global-norm clipping,
as mdm_jax's optax chain. Float32 only, all of the machine's cores (`torch.set_num_threads`).
"""

from __future__ import annotations

import os

import numpy as np


class TorchReference:
    """`step(tokens)` runs one full train step on a [B, L + 1] int32 host batch."""

    def __init__(self, model_args, seq_len: int, *, objective: str = "mdm", lr: float = 2e-4,
                 betas=(0.9, 0.95), weight_decay: float = 0.1, grad_clip: float = 1.0,
                 eps: float = 1e-3, seed: int = 0, threads: int = 0):
        import torch

        from mdm_jax.export.torch_model import EncoderConfig, TransEncoder

        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch.manual_seed(seed)
        a = model_args
        self.torch = torch
        self.objective, self.eps, self.grad_clip = objective, eps, grad_clip
        self.seq_len, self.mask_id = seq_len, a.mask_id
        self.model = TransEncoder(EncoderConfig(
            n_layer=a.n_layer, n_head=a.n_head, head_dim=a.head_dim, d_model=a.d_model,
            mlp_dim=a.mlp_dim, vocab_size=a.vocab_size, embedding_rows=a.embedding_rows,
            causal=objective == "arm", rope_base=a.rope_base, norm_eps=a.norm_eps))
        for p in self.model.parameters():  # small init, like the JAX model's, for finite losses
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas,
                                           weight_decay=weight_decay, foreach=True)

    def _loss(self, tokens):
        torch, F = self.torch, self.torch.nn.functional
        if self.objective == "arm":
            logits = self.model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        x0 = tokens[:, : self.seq_len]
        b, length = x0.shape
        p = (1 - self.eps) * torch.rand(b) + self.eps
        masked = torch.rand(b, length) < p[:, None]
        logits = self.model(torch.where(masked, self.mask_id, x0))
        ce = F.cross_entropy(logits[masked], x0[masked], reduction="none")
        return (ce / p[:, None].expand(b, length)[masked]).sum() / (b * length)

    def step(self, host_tokens: np.ndarray) -> float:
        torch = self.torch
        tokens = torch.from_numpy(np.asarray(host_tokens, dtype=np.int64))
        loss = self._loss(tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        return float(loss.detach())
