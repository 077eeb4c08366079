"""SMDM's own MDM train step, to measure mdm_jax's against: ML-GSAI/SMDM's
`lit_gpt.diffmodel.TransEncoder` (imported from a checkout by `references.import_smdm`, with
plain-torch stand-ins only for its CUDA kernels) initialised by its own `_init_weights`, the loss
of its `pretrain/train_mdm.py` (`forward_process`: t ~ U(0, 1), p = (1 - eps) t + eps, each
token masked w.p. p; cross-entropy of the masked tokens over p, summed, over B * L) and its
optimizer (`torch.optim.AdamW(..., foreach=False)` after clipping the gradient norm at 1, which
is what `fabric.clip_gradients` does on one device). Float32 on the CPU.

`SMDMProcess` runs it in a process of its own, stepping when asked, so the benchmark still
alternates the steps on the same machine state while PyTorch's allocator is its own: with
glibc's defaults (as SMDM runs) or with the malloc settings mdm_jax applies to itself on import
(`mdm_jax/host_memory.py`: without them every step maps and faults in its large buffers again,
which costs SMDM's step as much as ours).
"""

from __future__ import annotations

import functools
import multiprocessing
import time
import types

import numpy as np
from references import UsageError, import_smdm


class SMDMStep:
    """`step(tokens)` runs one SMDM train step on a [B, L + 1] int32 host batch (the first L
    tokens are the sequence, as mdm_jax's MDM uses them)."""

    def __init__(self, smdm_path, model_args: dict, seq_len: int, *, lr: float, betas, weight_decay:
                 float, grad_clip: float, eps: float, seed: int = 0, threads: int = 0):
        import os

        import torch

        diffmodel = import_smdm(smdm_path)
        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch.manual_seed(seed)
        a = types.SimpleNamespace(**model_args)
        if a.rope_base != 10000:
            raise UsageError("error: SMDM fixes RoPE base at 10000; pick a preset with it "
                             "(--preset 19M, tiny, ...)")
        # The Diff_LLaMA presets' fields; "RMSNorm" is SMDM's plain-torch norm (its presets name
        # FusedRMSNorm, the same function as a CUDA kernel).
        config = diffmodel.Config(
            name="benchmark", block_size=seq_len, vocab_size=a.vocab_size,
            padding_multiple=64, padded_vocab_size=a.vocab_size, n_layer=a.n_layer,
            n_head=a.n_head, n_embd=a.d_model, rotary_percentage=1.0, parallel_residual=False,
            bias=False, n_query_groups=a.n_head, shared_attention_norm=False,
            _norm_class="RMSNorm", norm_eps=a.norm_eps, _mlp_class="LLaMAMLP",
            intermediate_size=a.mlp_dim)
        self.torch, self.eps, self.grad_clip = torch, eps, grad_clip
        self.seq_len, self.mask_id = seq_len, a.vocab_size  # SMDM's mask id: the vocabulary size
        self.model = diffmodel.TransEncoder(config)
        self.model.apply(functools.partial(self.model._init_weights, n_layer=config.n_layer))
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas,
                                           weight_decay=weight_decay, foreach=False)
        self.loss_func = torch.nn.CrossEntropyLoss(reduction="none")

    def _forward_process(self, batch):
        torch = self.torch
        b, length = batch.shape
        t = torch.rand((b,))
        p_mask = ((1 - self.eps) * t + self.eps)[:, None].repeat(1, length)
        mask_indices = torch.rand((b, length)) < p_mask
        return torch.where(mask_indices, self.mask_id, batch), mask_indices, p_mask

    def step(self, host_tokens: np.ndarray) -> float:
        torch = self.torch
        input_ids = torch.from_numpy(np.asarray(host_tokens, dtype=np.int64))[:, :self.seq_len]
        noisy_input, mask_indices, p_mask = self._forward_process(input_ids)
        logits = self.model(noisy_input)
        loss = self.loss_func(logits[mask_indices], input_ids[mask_indices]) / p_mask[mask_indices]
        loss = loss.sum() / (input_ids.shape[0] * input_ids.shape[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


# The model's sizes SMDMStep reads (a plain dict: the worker process never imports mdm_jax).
MODEL_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "mlp_dim", "norm_eps", "rope_base")


def _serve(conn, malloc: str, args, kwargs) -> None:
    if malloc == "tuned":  # mdm_jax's glibc settings (mdm_jax/host_memory.py), nothing else
        import importlib.util
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "mdm_jax", "host_memory.py")
        spec = importlib.util.spec_from_file_location("host_memory", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.tune()
    try:
        step = SMDMStep(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which exits
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while (tokens := conn.recv()) is not None:
        t0 = time.perf_counter()
        loss = step.step(tokens)
        conn.send((time.perf_counter() - t0, loss))


class SMDMProcess:
    """SMDMStep in a spawned process: `step(tokens)` -> (seconds the step took there, loss).
    `malloc`: "system" (glibc's defaults, as SMDM runs) or "tuned" (the settings mdm_jax
    applies to its own process on import)."""

    def __init__(self, smdm_path, model_args, seq_len: int, malloc: str = "system", **kwargs):
        fields = {name: getattr(model_args, name) for name in MODEL_FIELDS}
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, daemon=True,
                                   args=(child, malloc, (smdm_path, fields, seq_len), kwargs))
        self.process.start()
        status, message = self.conn.recv()
        if status == "error":
            raise SystemExit(f"SMDM's step failed to build: {message}")

    def step(self, host_tokens: np.ndarray) -> tuple[float, float]:
        self.conn.send(np.asarray(host_tokens, np.int32))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)
